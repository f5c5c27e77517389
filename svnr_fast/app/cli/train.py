"""`svnr train` and `torchrun --nproc_per_node N -m svnr_fast.app.cli.train ...`.

One process trains on one device; under torchrun every process trains one replica with
DistributedDataParallel (NCCL on GPUs, gloo on CPUs), each on its own crops (the global batch is
`--batch-size` times the number of processes). The run folder RUN holds:
  checkpoint.safetensors   everything needed to resume (`--resume`), written atomically
  model.safetensors        the EMA weights at the last checkpoint (svnr_fast.app.checkpoint.load_model reads it)
  best.safetensors         the EMA weights with the best held-out PSNR so far
  log.jsonl                loss, learning rate, it/s and held-out PSNR over time
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

from .. import data, training
from ..checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from ..imageio import ImageError
from ..models import PRESETS

CHECKPOINT = "checkpoint.safetensors"


class UsageError(ValueError):
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `svnr train`. Defaults are applied later, so that `--resume` can tell what was given."""
    S = argparse.SUPPRESS
    defaults = training.TrainConfig()
    parser.add_argument("--data", type=Path, default=S,
                        help="folder of training photos (PNG/JPEG/TIFF, searched recursively); when it holds "
                             "train/ and heldout/ subfolders (as scripts/make_dataset.py writes), those are used")
    parser.add_argument("--heldout", type=Path, default=S, help="folder of held-out photos for the PSNR metric")
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, best model, log)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=S, help=f"model size (default {defaults.preset})")
    parser.add_argument("--parametrisation", choices=["edm", "epsilon"], default=S,
                        help=f"network output: EDM-preconditioned x0 or the noise (default {defaults.parametrisation})")
    scheme = parser.add_mutually_exclusive_group()
    scheme.add_argument("--baseline", dest="scheme", action="store_const", const="baseline", default=S,
                        help="train the conventional scalar-time conditional diffusion baseline")
    scheme.add_argument("--no-correlation", dest="scheme", action="store_const", const="uncorrelated", default=S,
                        help="ablation: x_t noise independent of the noise of y'")
    parser.add_argument("--time-map", choices=training.TIME_MAPS, default=S,
                        help="svnr schemes: the time map and y' from the clean image (true, DESIGN.md §1.4) or "
                             "from a noisy observation, as inference computes them (observed; see "
                             f"training.observed_sample) (default {defaults.time_map})")
    parser.add_argument("--init", type=str, default=S, metavar="MODEL",
                        help="start from the weights of this model file (e.g. a best.safetensors) instead of random ones")
    parser.add_argument("--steps", type=int, default=S, help=f"total optimiser steps (default {defaults.steps})")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop cleanly, with a checkpoint, before this much wall time has passed")
    parser.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                        help="stop, with a checkpoint, at this step (train in sittings; continue with --resume)")
    parser.add_argument("--batch-size", type=int, default=S, help=f"per process (default {defaults.batch_size})")
    parser.add_argument("--crop", type=int, default=S, help=f"training crop size (default {defaults.crop})")
    parser.add_argument("--lr", type=float, default=S, help=f"peak learning rate (default {defaults.lr})")
    parser.add_argument("--warmup-steps", type=int, default=S, help=f"(default {defaults.warmup_steps})")
    parser.add_argument("--weight-decay", type=float, default=S, help=f"(default {defaults.weight_decay})")
    parser.add_argument("--grad-clip", type=float, default=S, help=f"(default {defaults.grad_clip})")
    parser.add_argument("--ema-decay", type=float, default=S, help=f"(default {defaults.ema_decay})")
    parser.add_argument("--sigma-r", type=float, nargs=2, metavar=("LOW", "HIGH"), default=S,
                        help=f"read-noise std range (default {defaults.sigma_r[0]} {defaults.sigma_r[1]})")
    parser.add_argument("--sigma-s", type=float, nargs=2, metavar=("LOW", "HIGH"), default=S,
                        help=f"shot-noise std range (default {defaults.sigma_s[0]} {defaults.sigma_s[1]})")
    parser.add_argument("--noise-distribution", choices=training.NOISE_DISTRIBUTIONS, default=S,
                        help=f"(default {defaults.noise_distribution})")
    parser.add_argument("--seed", type=int, default=S, help=f"(default {defaults.seed})")
    parser.add_argument("--log-every", type=int, default=S, help=f"steps (default {defaults.log_every})")
    parser.add_argument("--eval-every", type=int, default=S,
                        help=f"steps between held-out evaluations, 0 for never (default {defaults.eval_every})")
    parser.add_argument("--checkpoint-every", type=int, default=S, help=f"steps (default {defaults.checkpoint_every})")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--workers", type=int, default=2, help="data loading processes (0: load in this one)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay each training step (forward, loss, backward, optimiser, EMA) from a CUDA graph: "
                             "one launch instead of thousands, the same arithmetic (CUDA, one process; a runtime "
                             "option, so a run may resume with or without it)")
    parser.add_argument("--compile", dest="compile_network", action="store_true",
                        help="torch.compile the network (fewer, fused kernels around the svnr ops: pays on GPUs, "
                             "where a small model's step is launch-bound; compiling takes a minute or more)")


def add_parser(subparsers) -> None:
    """Register `svnr train` on the `svnr` command line."""
    parser = subparsers.add_parser("train", help="train an SVNR denoiser on a folder of photos",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(run=run)


_CONFIG_FIELDS = {f.name for f in dataclasses.fields(training.TrainConfig)}


def _config_options(args: argparse.Namespace) -> dict:
    options = {k: v for k, v in vars(args).items() if k in _CONFIG_FIELDS}
    for key in ("sigma_r", "sigma_s"):
        if key in options:
            options[key] = tuple(options[key])
    return options


def resolve_config(args: argparse.Namespace, checkpoint_config: training.TrainConfig | None) -> training.TrainConfig:
    """The run's TrainConfig: the defaults with the given options, or (resuming) the saved one.

    Resuming may change only training.RUNTIME_OPTIONS; any other option that differs from the saved
    run is an error rather than a silent change of what is being trained.
    """
    options = _config_options(args)
    try:
        if checkpoint_config is None:
            return training.TrainConfig(**options)
        saved = dataclasses.asdict(checkpoint_config)
        changed = sorted(k for k, v in options.items() if k not in training.RUNTIME_OPTIONS and saved[k] != v)
        if changed:
            described = ", ".join(f"--{k.replace('_', '-')} (saved: {saved[k]}, given: {options[k]})" for k in changed)
            raise UsageError(f"the run in --out was started with other options: {described}; drop them to "
                             "resume it, or start a new run in another folder")
        return dataclasses.replace(checkpoint_config, **{k: v for k, v in options.items() if k in training.RUNTIME_OPTIONS})
    except (TypeError, ValueError) as err:
        if isinstance(err, UsageError):
            raise
        raise UsageError(str(err)) from err


def setup_distributed(device_arg: str | None) -> tuple[training.World, torch.device]:
    """The process group torchrun describes in the environment (if any) and this process's device."""
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    wanted = device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
    if wanted not in ("cpu", "cuda") and not wanted.startswith("cuda:"):
        raise UsageError(f"--device must be cpu or cuda, got {device_arg!r}")
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
    if world_size == 1:
        return training.World(), torch.device(wanted)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if wanted.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return training.World(rank, world_size), device


def run(args: argparse.Namespace) -> int:
    try:
        return _train(args)
    except (UsageError, CheckpointError, ImageError, FileNotFoundError) as err:
        print(f"svnr train: error: {err}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    out: Path = args.out
    checkpoint_path = out / CHECKPOINT
    saved_metadata: dict = {}
    if args.resume:
        if not checkpoint_path.is_file():
            raise UsageError(f"--resume: there is no {CHECKPOINT} in {out} to resume")
        _, saved_metadata, saved_config = read_checkpoint(checkpoint_path)
        config = resolve_config(args, saved_config)
    else:
        if checkpoint_path.exists():
            raise UsageError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
        config = resolve_config(args, None)
    data_dir = getattr(args, "data", None) or (Path(saved_metadata["data"]) if "data" in saved_metadata else None)
    if data_dir is None:
        raise UsageError("--data is required: a folder of training photos")
    train_dir, heldout_dir = data.split_folder(data_dir)
    heldout_dir = getattr(args, "heldout", None) or heldout_dir or (
        Path(saved_metadata["heldout"]) if saved_metadata.get("heldout") else None)

    world, device = setup_distributed(args.device)
    if args.cuda_graph and (device.type != "cuda" or world.size > 1 or args.compile_network):
        raise UsageError(f"--cuda-graph replays one process's steps on a CUDA device (here: {device}, {world.size} "
                         f"process(es){', with --compile' if args.compile_network else ''}); drop --cuda-graph")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True      # fixed crop shapes: let cuDNN pick its fastest kernels
    try:
        dataset = data.RandomCropBatches(data.find_images(train_dir), config.batch_size, config.crop, config.seed,
                                         world.rank)
        heldout = data.heldout_crops(data.find_images(heldout_dir), config.eval_crop) if heldout_dir else None
        if args.resume:
            state = load_checkpoint(checkpoint_path, config, device, world)
        else:
            state = training.new_state(config, device, world.rank)
        lead = world.rank == 0
        if lead:
            n_params = sum(p.numel() for p in state.model.parameters())
            print(f"svnr train: {config.preset} model ({n_params / 1e6:.2f} M parameters, {config.parametrisation}), "
                  f"scheme {config.scheme}, {len(dataset.files)} training photos in {train_dir}, "
                  f"{len(heldout) if heldout else 0} held-out crops, {world.size} x {device}, "
                  f"steps {state.step} -> {config.steps}", file=sys.stderr)
        if state.step >= config.steps:
            if lead:
                print(f"svnr train: the run is already at step {state.step} of {config.steps}; pass a larger "
                      "--steps to continue it", file=sys.stderr)
            return 0
        started = time.monotonic()
        metadata = {"data": str(data_dir), "heldout": str(heldout_dir or "")}
        training.fit(state, config, dataset, run_dir=out, heldout=heldout, world=world,
                     max_minutes=args.max_minutes, workers=args.workers, progress=args.progress,
                     compile_network=args.compile_network, cuda_graph=args.cuda_graph,
                     checkpoint_metadata=metadata, stop_at=args.stop_at)
        if lead:
            minutes = (time.monotonic() - started) / 60
            best = f", best held-out PSNR {state.best_metric:.2f} dB" if state.best_metric is not None else ""
            print(f"svnr train: stopped at step {state.step} of {config.steps} after {minutes:.1f} min{best}; "
                  f"run folder {out}" + ("" if state.step >= config.steps else " (continue with --resume)"),
                  file=sys.stderr)
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m svnr_fast.app.cli.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
