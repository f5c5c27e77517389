"""The training loop: steps, logging, held-out evaluation, checkpoints, time limits and stop signals."""
from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .. import checkpoint
from .. import data as data_lib
from .config import TrainConfig, World
from .step import NetworkOutput, StepGraph, TrainState, heldout_psnr, lr_at, train_step


class _StopRequest:
    """SIGINT/SIGTERM ask the loop to stop at the next check (with a checkpoint); a second SIGINT aborts."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:     # not the main thread: no signal handling
            pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _log(run_dir: Path | None, record: dict) -> None:
    if run_dir is not None:
        with (run_dir / "log.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")


def fit(state: TrainState, config: TrainConfig, dataset: data_lib.RandomCropBatches, *, run_dir=None,
        heldout: list[torch.Tensor] | None = None, world: World = World(), max_minutes: float | None = None,
        workers: int = 0, progress: bool = True, checkpoint_metadata: dict[str, str] | None = None,
        stop_at: int | None = None, compile_network: bool = False, cuda_graph: bool = False) -> TrainState:
    """Train from `state.step` to `config.steps`, or until step `stop_at`, `max_minutes` or a SIGINT/SIGTERM.

    Writes `run_dir/checkpoint.safetensors` every `checkpoint_every` steps and when it stops,
    `run_dir/model.safetensors` (the EMA weights) with it, `run_dir/best.safetensors` whenever the
    held-out PSNR of the EMA weights improves, and `run_dir/log.jsonl`. Under DDP every rank calls it.
    `cuda_graph` replays each step after its sample from a CUDA graph (StepGraph; CUDA, one process).
    `compile_network` runs the network through torch.compile (the svnr ops stay opaque custom ops inside
    the graph); it changes speed, not the math, so a run may be resumed with or without it.
    """
    from tqdm import tqdm

    run_dir = Path(run_dir) if run_dir is not None else None
    device = state.model.variance_table.device
    lead = world.rank == 0
    if lead and run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
    network: nn.Module = NetworkOutput(state.model)
    if world.size > 1:
        network = nn.parallel.DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)
    if compile_network:
        network = torch.compile(network)
    if cuda_graph and (device.type != "cuda" or world.size > 1 or compile_network):
        raise ValueError(f"cuda_graph replays one process's steps on a CUDA device (got {device}, {world.size} "
                         f"process(es){', a compiled network' if compile_network else ''}); drop it there")
    graph = StepGraph() if cuda_graph else None
    last = config.steps if stop_at is None else min(stop_at, config.steps)
    loader = data_lib.batch_loader(dataset, state.step, last, workers, pin_memory=device.type == "cuda")
    bar = tqdm(total=config.steps, initial=state.step, disable=not (progress and lead), dynamic_ncols=True,
               smoothing=0.05, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    started, start_step, postfix = time.monotonic(), state.step, {}
    last_check, last_check_step = started, state.step
    loss_sum, loss_count = torch.zeros((), device=device), 0
    with _StopRequest() as stop_request:
        for x0 in loader:
            loss_sum += train_step(state, network, x0.to(device, non_blocking=True), config, world.rank, graph)
            loss_count += 1
            bar.update(1)
            step, stop = state.step, False
            if step == start_step + 1:     # the first step carries the start-up (workers, first batch)
                last_check = time.monotonic()
                last_check_step = step
            if step % config.log_every == 0 or step == config.steps:
                loss = _mean_over_ranks(loss_sum / loss_count, world)
                loss_sum.zero_()
                loss_count = 0
                now = time.monotonic()
                elapsed, rate = now - started, (step - start_step) / max(now - started, 1e-9)
                recent_rate = (step - last_check_step) / max(now - last_check, 1e-9)   # start-up excluded
                last_check, last_check_step = now, step
                stop = _agree(stop_request.requested or _out_of_time(elapsed, recent_rate, config, max_minutes), world)
                postfix.update(loss=f"{loss:.4f}", lr=f"{lr_at(step - 1, config):.2e}")
                if lead:
                    _log(run_dir, {"step": step, "loss": loss, "lr": lr_at(step - 1, config),
                                   "it_per_s": rate, "elapsed_s": elapsed})
            stop = stop or step == last
            final = step == config.steps or stop
            if lead and heldout and config.eval_every and (step % config.eval_every == 0 or final):
                postfix["held-out"] = f"{_evaluate(state, config, heldout, run_dir, bar):+.2f}dB"
            bar.set_postfix(postfix, refresh=False)
            if run_dir is not None and (step % config.checkpoint_every == 0 or final):
                checkpoint.save_checkpoint(run_dir / "checkpoint.safetensors", state, config, world, checkpoint_metadata)
                if lead:
                    checkpoint.save_model(state.ema, run_dir / "model.safetensors", {"step": str(step),
                                                                         "train_config": config.to_json()})
            if stop:
                break
    bar.close()
    return state


def _evaluate(state: TrainState, config: TrainConfig, heldout, run_dir: Path | None, bar) -> float:
    """Held-out PSNR of the EMA weights; keeps the best as best.safetensors; returns the gain in dB."""
    noisy, denoised = heldout_psnr(state.ema, heldout, config.scheme, config.eval_noise, config.seed)
    improved = state.best_metric is None or denoised > state.best_metric
    if improved:
        state.best_metric = denoised
        if run_dir is not None:
            checkpoint.save_model(state.ema, run_dir / "best.safetensors",
                       {"step": str(state.step), "heldout_psnr": f"{denoised:.4f}", "heldout_noisy_psnr": f"{noisy:.4f}",
                        "heldout_noise": json.dumps(config.eval_noise), "train_config": config.to_json()})
    bar.write(f"step {state.step}: held-out PSNR {denoised:.2f} dB (noisy {noisy:.2f} dB, "
              f"{denoised - noisy:+.2f} dB){' *best*' if improved else ''}")
    _log(run_dir, {"step": state.step, "heldout_psnr": denoised, "heldout_noisy_psnr": noisy,
                   "heldout_gain_db": denoised - noisy, "best": improved})
    return denoised - noisy


def _out_of_time(elapsed: float, rate: float, config: TrainConfig, max_minutes: float | None) -> bool:
    """Stop now when the next check (log_every steps away at `rate` steps/s, plus a margin for the
    checkpoint and a held-out evaluation) would come after the limit."""
    if max_minutes is None:
        return False
    to_next_check = config.log_every / max(rate, 1e-9)
    return elapsed + 1.5 * to_next_check + 10.0 > 60.0 * max_minutes


def _mean_over_ranks(value: torch.Tensor, world: World) -> float:
    if world.size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world.size
    return float(value.item())


def _agree(flag: bool, world: World) -> bool:
    """True on every rank when it is true on any (ranks must stop at the same step)."""
    if world.size == 1:
        return flag
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([float(flag)], device=backend_device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
