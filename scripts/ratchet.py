"""The training ratchet: every GPU session continues the bundled model's training where the last one stopped,
and the bundled model changes only when held-out PSNR improves.

    python scripts/ratchet.py --data data/photos --work runs/ratchet --seconds 420 --device cuda -- --batch-size 64

1. The committed training state (STATE, training-state/svnr-small.safetensors: model and EMA in float32, the
   steps behind them and the training config; no optimiser moments, which the warm-up of each session
   re-warms) starts a new `svnr train` run with `--init STATE`, the state's config and a seed of its own
   (the steps so far), for `--steps N` or, on a GPU, a wall-clock budget (`--seconds`, through
   scripts/train_on_gpu.py, which fits the cosine schedule to it). Options after `--` go to `svnr train`.
2. The held-out metric (`heldout_metric`: PSNR of svnr_fast.denoise with its defaults, the true noise given,
   on the held-out photos' centre crops at the three levels of svnr eval, fixed noise) of the state's EMA and
   of the run's final EMA, measured in the same process.
3. Improved: the run's model and EMA become the new STATE (checkpoint.compact_checkpoint), its EMA is bundled
   (scripts/bundle_model.py, float16) as BUNDLE and a row is added to the model card's history. Not improved:
   the state and the bundle stay. Either way the session and its training log are appended to LOG, and
   `--commit` commits what changed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LEVELS = ((0.02, 0.05), (0.05, 0.10), (0.10, 0.20))
# the options of the state's config that every session keeps (the rest is the session's own)
KEPT_OPTIONS = ("preset", "parametrisation", "scheme", "time_map", "crop", "batch_size", "lr", "weight_decay",
                "grad_clip", "ema_decay", "sigma_r", "sigma_s", "noise_distribution")
HISTORY_HEADER = "## Training history (the ratchet)"


def state_record(path: Path) -> tuple[dict, int]:
    """(the state's training config, the steps behind its weights)."""
    from svnr_fast.app.checkpoint import CHECKPOINT_FORMAT, read_safetensors, steps_behind
    _, metadata = read_safetensors(path, CHECKPOINT_FORMAT)
    return json.loads(metadata["train_config"]), steps_behind(metadata, path)


def train_arguments(config: dict) -> list[str]:
    """`svnr train` options that give a new run the state's config."""
    args = []
    for key in KEPT_OPTIONS:
        value, flag = config[key], "--" + key.replace("_", "-")
        if key == "scheme":
            args += {"svnr": [], "uncorrelated": ["--no-correlation"], "baseline": ["--baseline"]}[value]
        elif isinstance(value, list):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args


def heldout_crops(data: Path, size: int) -> list[torch.Tensor]:
    from svnr_fast.app import data as data_lib
    _, heldout = data_lib.split_folder(data)
    if heldout is None:
        raise SystemExit(f"ratchet: {data} has no heldout/ folder (python scripts/make_dataset.py --out {data})")
    return data_lib.heldout_crops(data_lib.find_images(heldout), size)


def heldout_metric(model, crops: list[torch.Tensor], device) -> float:
    """Mean PSNR of svnr_fast.denoise (its defaults, the true noise level) over crops x LEVELS, fixed noise."""
    from svnr_fast import PoissonGaussian, denoise
    from svnr_fast.app.metrics import psnr
    scores = []
    for i, crop in enumerate(crops):
        clean = crop.to(device)[None]
        for k, level in enumerate(LEVELS):
            generator = torch.Generator(device=device).manual_seed(1000 * i + k)
            noisy = PoissonGaussian(*level).sample(clean, generator=generator)
            scores.append(psnr(denoise(noisy, level, model=model, seed=i), clean))
    return sum(scores) / len(scores)


def ema_model(path: Path, device):
    """The EMA of a training checkpoint (or compact state) as an eval-mode model."""
    from svnr_fast.app.checkpoint import CHECKPOINT_FORMAT, config_from_metadata, read_safetensors
    from svnr_fast.app.models import SVNRUNet
    tensors, metadata = read_safetensors(path, CHECKPOINT_FORMAT)
    model = SVNRUNet(config_from_metadata(metadata, path))
    model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    return model.to(device).eval()


def create_state(model_file: Path, state: Path, steps_behind: int) -> None:
    """A first training state from a model file: its weights as both model and EMA (in float32), its training
    config, and the steps that made it. What an earlier run's optimiser and float32 master weights held is
    lost; the sessions' warm-up re-warms the moments."""
    from svnr_fast.app.checkpoint import CHECKPOINT_FORMAT, MODEL_FORMAT, atomic_save, load_model, read_safetensors
    _, metadata = read_safetensors(model_file, MODEL_FORMAT)
    weights = load_model(model_file).state_dict()
    tensors = {f"{part}.{k}": v.float().clone() for part in ("model", "ema") for k, v in weights.items()}
    atomic_save(tensors, {"format": CHECKPOINT_FORMAT, "model_config": metadata["model_config"],
                          "train_config": metadata["train_config"], "step": str(steps_behind), "prior_steps": "0",
                          "created_from": str(model_file)}, state)


def add_history_row(card: Path, row: str) -> None:
    text = card.read_text()
    if HISTORY_HEADER not in text:
        text = text.rstrip("\n") + (f"\n\n{HISTORY_HEADER}\n\n`python scripts/ratchet.py` (scripts/gpu_session.sh "
                                    "ratchet) continues training from training-state/ and bundles the EMA when the "
                                    "held-out metric improves.\n\n| date | machine | session steps | total steps | "
                                    "held-out PSNR before | after |\n| --- | --- | --- | --- | --- | --- |\n")
    card.write_text(text.rstrip("\n") + "\n" + row + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="dataset root with train/ and heldout/")
    parser.add_argument("--work", type=Path, help="a new folder for this session's run")
    parser.add_argument("--state", type=Path, default=ROOT / "training-state" / "svnr-small.safetensors")
    parser.add_argument("--bundle", type=Path, default=ROOT / "svnr_fast" / "weights" / "svnr-small.safetensors")
    parser.add_argument("--card", type=Path, default=ROOT / "svnr_fast" / "weights" / "svnr-small.md")
    parser.add_argument("--log", type=Path, default=ROOT / "training-state" / "svnr-small-log.jsonl")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int, help="train this many steps")
    budget.add_argument("--seconds", type=float, help="train for this wall-clock budget (GPU: train_on_gpu.py)")
    budget.add_argument("--create-state-from", type=Path, metavar="MODEL",
                        help="write a first --state from a model file (with --steps-behind) and stop")
    parser.add_argument("--steps-behind", type=int, default=0, help="the training steps that made that model")
    parser.add_argument("--warmup-steps", type=int, default=200, help="re-warms the optimiser moments")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--eval-crop", type=int, default=256)
    parser.add_argument("--commit", action="store_true", help="git commit the state, bundle, card and log")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then more options of svnr train")
    args = parser.parse_args(argv)
    extra = [a for a in args.train_args if a != "--"]
    if args.create_state_from is not None:
        create_state(args.create_state_from, args.state, args.steps_behind)
        print(f"ratchet: wrote {args.state} ({args.state.stat().st_size / 1e6:.1f} MB)")
        return 0
    if args.data is None or args.work is None:
        raise SystemExit("ratchet: --data and --work are needed to train")
    if args.work.exists():
        raise SystemExit(f"ratchet: {args.work} exists; give a new --work folder")
    config, prior = state_record(args.state)
    started = datetime.datetime.now(datetime.timezone.utc)
    session = [*train_arguments(config), "--data", str(args.data), "--init", str(args.state), "--seed", str(prior),
               "--warmup-steps", str(args.warmup_steps), *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if args.seconds is not None:
        command = [sys.executable, str(ROOT / "scripts" / "train_on_gpu.py"), "--seconds", str(args.seconds),
                   "--out", str(args.work), "--", *session]
    else:
        command = [sys.executable, "-m", "svnr_fast.app.cli", "train", "--out", str(args.work), "--steps",
                   str(args.steps), "--device", args.device, "--no-progress", *session]
    print("ratchet:", shlex.join(command), flush=True)
    if args.seconds is not None:
        subprocess.run(command, check=True, env=env)
    else:
        from svnr_fast.app.cli import main as svnr
        if svnr(command[3:]) != 0:
            raise SystemExit("ratchet: training failed (see above); the state and the bundle are unchanged")

    device = torch.device(args.device)
    crops = heldout_crops(args.data, args.eval_crop)
    run_checkpoint = args.work / "checkpoint.safetensors"
    before = heldout_metric(ema_model(args.state, device), crops, device)
    after = heldout_metric(ema_model(run_checkpoint, device), crops, device)
    _, total = state_record(run_checkpoint)
    improved = after > before
    print(f"ratchet: held-out PSNR {before:.3f} -> {after:.3f} dB after {total - prior} steps "
          f"({'improved: new state and bundle' if improved else 'not improved: state and bundle kept'})", flush=True)
    changed = [args.log]
    if improved:
        from svnr_fast.app.checkpoint import compact_checkpoint
        compact_checkpoint(run_checkpoint, args.state, {"heldout_metric": f"{after:.4f}"})
        sys.path.insert(0, str(ROOT / "scripts"))
        from bundle_model import bundle
        print("ratchet:", bundle(args.work / "model.safetensors", args.bundle), flush=True)
        machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
        add_history_row(args.card, f"| {started:%Y-%m-%d} | {machine} | {total - prior} | {total} | {before:.2f} | "
                                   f"{after:.2f} |")
        changed += [args.state, args.bundle, args.card]
    record = {"session_started": started.isoformat(timespec="seconds"), "command": shlex.join(command),
              "steps_before": prior, "steps_after": total, "heldout_psnr_before": before, "heldout_psnr_after": after,
              "improved": improved}
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with args.log.open("a") as f:
        f.write(json.dumps(record) + "\n")
        for line in (args.work / "log.jsonl").read_text().splitlines():
            f.write(json.dumps({"session_started": record["session_started"], **json.loads(line)}) + "\n")
    if args.commit:
        subprocess.run(["git", "add", *map(str, changed)], check=True)
        message = (f"Ratchet: {total - prior} more training steps ({total} in all), held-out PSNR {before:.2f} -> "
                   f"{after:.2f} dB" + (", bundled" if improved else ", not improved: bundle kept"))
        subprocess.run(["git", "commit", "-m", message], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
