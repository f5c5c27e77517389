"""`svnr eval`: see svnr_fast.app.evaluation."""
from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from pathlib import Path

from ..denoise import BUNDLED_MODEL
from ..evaluation.methods import (
    DEFAULT_LEVELS,
    DEFAULT_METHODS,
    METHOD_CHOICES,
    Method,
    level_label,
    parse_level,
    parse_method,
)
from ..evaluation.report import (
    machine_description,
    markdown_table,
    summarise,
    write_outputs,
)
from ..evaluation.runner import (
    evaluate,
    image_files,
    load_eval_model,
    load_images,
    resolve_methods,
)


def _argument_type(parse):
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    convert.__name__ = parse.__name__
    return convert


def _methods_argument(text: str) -> list[Method]:
    return [parse_method(part) for part in text.split(",") if part.strip()]


def command_line(args: argparse.Namespace, models: dict[str, Path | None]) -> str:
    """The `svnr eval` command that repeats this run, every option spelled out."""
    parts = ["svnr eval", "--data", shlex.quote(str(args.data)), "--levels", *map(level_label, args.levels),
             "--methods", *(m.name for group in args.methods for m in group)]
    parts += [f"--{role} {shlex.quote(str(path))}" for role, path in models.items() if path is not None]
    if args.limit is not None:
        parts += ["--limit", str(args.limit)]
    parts += ["--crop", str(args.crop), "--noise", args.noise, "--eta", f"{args.eta:g}", "--batch", str(args.batch),
              "--seed", str(args.seed), "--device", args.device, "--out", shlex.quote(str(args.out))]
    return " ".join(parts)


def run_eval(args: argparse.Namespace) -> int:
    from ..checkpoint import CheckpointError
    from ..imageio import ImageError
    from .common import pick_device

    def fail(message: str):
        raise SystemExit(f"svnr eval: {message}")

    if args.crop < 0:
        fail(f"--crop must be >= 0 (0: whole photos), got {args.crop}")
    if args.limit is not None and args.limit < 1:
        fail(f"--limit must be >= 1, got {args.limit}")
    if args.batch < 1:
        fail(f"--batch must be >= 1, got {args.batch}")
    if not 0 <= args.eta <= 1:
        fail(f"--eta must lie in [0, 1], got {args.eta}")
    device = pick_device(args.device)
    try:
        files, folder = image_files(args.data)
        images = load_images(files, folder, args.crop, args.limit)
    except (FileNotFoundError, ImageError, ValueError) as err:
        fail(str(err))
    given = {"svnr": args.svnr, "ablation": args.ablation, "baseline": args.baseline}
    if given["svnr"] is None and BUNDLED_MODEL.is_file():
        given["svnr"] = BUNDLED_MODEL
    missing_model = {
        "svnr": f"no SVNR model: pass --svnr MODEL (the bundled model {BUNDLED_MODEL.name} is not installed)",
        "ablation": "no ablation model: pass --ablation MODEL (trained with `svnr train --no-correlation`)",
        "baseline": "no baseline model: pass --baseline MODEL (trained with `svnr train --baseline`)"}
    models = {}
    for role, path in given.items():
        if path is None:
            continue
        try:
            models[role] = load_eval_model(Path(path), role, device)
        except (FileNotFoundError, CheckpointError, ValueError) as err:
            fail(f"--{role}: {err}")
    requested = [m for group in args.methods for m in group]
    networks = {role: loaded.model for role, loaded in models.items()}
    try:
        methods, skipped = resolve_methods(requested, networks, missing_model)
    except ValueError as err:
        fail(str(err))
    for name, reason in skipped:
        print(f"svnr eval: skipping {name}: {reason}", file=sys.stderr)
    if not methods:
        fail("none of the methods asked for can run here (see the reasons above)")
    levels = args.levels
    sizes = sorted({f"{i.clean.shape[2]}x{i.clean.shape[1]}" for i in images})
    print(f"svnr eval: {len(images)} photo(s) from {folder} ({', '.join(sizes)}), levels "
          f"{' '.join(map(level_label, levels))}, methods {' '.join(m.name for m in methods)}, on {device.type}",
          file=sys.stderr)
    try:
        evaluation = evaluate(images, levels, methods, networks, device=device, batch=args.batch, eta=args.eta,
                              seed=args.seed, noise=args.noise, progress=not args.quiet)
    except ValueError as err:
        fail(str(err))
    summary = summarise(evaluation)
    header = [f"command: `{command_line(args, given)}`",
              f"data: {folder}, {len(images)} photo(s): {', '.join(i.name for i in images)}; centre crops of at most "
              f"{args.crop}x{args.crop} px" if args.crop else f"data: {folder}, {len(images)} whole photo(s)",
              f"noise: Poisson-Gaussian, not clipped, seed {args.seed}; methods given the "
              + ("parameters estimated from each noisy photo" if args.noise == "estimated" else "true level"),
              f"sampling: eta {args.eta:g}, x0_hat clamped to [0, 1], batches of up to {args.batch} photos",
              *[f"{role} model: {m.path} ({m.note})" for role, m in models.items()],
              f"machine: {machine_description(device)}",
              f"date: {datetime.datetime.now().isoformat(timespec='seconds')}, total {evaluation.seconds:.1f} s"]
    files = write_outputs(args.out, evaluation, summary, header, skipped)
    print(markdown_table(summary))
    print(f"svnr eval: {evaluation.seconds:.1f} s; wrote {', '.join(str(f) for f in files)}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "eval", help="compare SVNR, the 1000-step baseline, the ablation and classical denoisers on clean photos",
        description="Noises clean photos synthetically and compares denoisers: PSNR, SSIM, high-frequency energy "
                    "ratio, network evaluations and time per photo; writes tables, picture grids and a "
                    "quality-vs-steps plot. Methods whose model or package is missing are skipped.")
    parser.add_argument("--data", type=Path, required=True,
                        help="folder of clean photos, or a dataset root with train/ and heldout/ (heldout/ is used)")
    parser.add_argument("--levels", type=_argument_type(parse_level), nargs="+", default=list(DEFAULT_LEVELS),
                        metavar="R,S", help="noise levels sigma_r,sigma_s (default: 0.02,0.05 0.05,0.1 0.1,0.2)")
    parser.add_argument("--methods", type=_argument_type(_methods_argument), nargs="+",
                        default=[[parse_method(m) for m in DEFAULT_METHODS]], metavar="METHOD",
                        help=f"any of {METHOD_CHOICES}, separated by spaces or commas; svnr and ablation take "
                             f"ceil(max tau*) steps, baseline all T (default: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--svnr", type=Path, default=None, metavar="MODEL",
                        help="the SVNR model (default: the bundled model)")
    parser.add_argument("--baseline", type=Path, default=None, metavar="MODEL",
                        help="a model trained with `svnr train --baseline` (methods baseline, baseline-N)")
    parser.add_argument("--ablation", type=Path, default=None, metavar="MODEL",
                        help="a model trained with `svnr train --no-correlation` (methods ablation, ablation-N)")
    parser.add_argument("--crop", type=int, default=256, help="centre crop of at most CROP x CROP px (0: whole photos)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N photos (sorted by path)")
    parser.add_argument("--noise", choices=["estimated", "true"], default="estimated",
                        help="noise parameters given to the methods: estimated from each noisy photo, or the true "
                             "level")
    parser.add_argument("--eta", type=float, default=1.0, help="sampler eta (1: the paper's posterior sampling)")
    parser.add_argument("--batch", type=int, default=8, help="photos per network call")
    parser.add_argument("--out", type=Path, default=Path("svnr-eval"), help="output folder")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run_eval)
