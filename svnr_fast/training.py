"""Training SVNR denoisers: samples, loss, optimiser, schedule, EMA, the loop and its checkpoints.

Three schemes (DESIGN.md §1.4), all drawing their samples on the device:
- "svnr" (default, the paper): y' and x_t from `svnr::training_sample` with the Brownian-bridge
  correlation between the noise of x_t and that of the condition y';
- "uncorrelated" (the ablation): the same op with `correlated=False`;
- "baseline" (a conventional conditional diffusion model): scalar tau ~ U(0, T) per image, x_t = x0 +
  sqrt(gamma(tau)) eps', condition = the observed y with its true Poisson-Gaussian noise, constant
  time map.
The loss is a masked MSE on the network output: the noise (epsilon) or EDM's preconditioned target
(see svnr_fast.models). AdamW, linear warm-up + cosine decay, gradient clipping, EMA weights, bf16
autocast on CUDA. Every random draw of step s on rank r comes from generators seeded by (seed, s, r),
so a run is deterministic on a CPU and a resumed run continues exactly; the loop synchronises with
the device only every `log_every` steps.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import data as data_lib
from . import reference
from .models import (MODEL_FORMAT, CheckpointError, SVNRUNet, UNetConfig, atomic_save, config_from_metadata,
                     load_weights, preset, read_safetensors, save_model)

CHECKPOINT_FORMAT = "svnr_fast.checkpoint"
SCHEMES = ("svnr", "uncorrelated", "baseline")
NOISE_DISTRIBUTIONS = ("uniform", "log-uniform")
TIME_MAPS = ("true", "observed")
# options that may change when a run is resumed; every other one is part of what the run is
RUNTIME_OPTIONS = ("steps", "log_every", "eval_every", "checkpoint_every")
_NOISE_STREAM, _EVAL_STREAM = 0x4E015E, 0xE7A1


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "small"
    parametrisation: str = "edm"           # "edm" (preconditioned x0) or "epsilon" (the paper)
    scheme: str = "svnr"                   # one of SCHEMES
    steps: int = 50_000
    batch_size: int = 16                   # per process
    crop: int = 64
    lr: float = 3e-4
    final_lr_ratio: float = 0.01           # the cosine decays the learning rate to lr * this
    warmup_steps: int = 500                # linear warm-up (at most a tenth of the run)
    weight_decay: float = 0.01             # on conv/linear weights only
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    sigma_r: tuple[float, float] = (0.005, 0.2)   # range of the read-noise std of the training photos
    sigma_s: tuple[float, float] = (0.01, 0.3)    # range of the shot-noise std
    noise_distribution: str = "uniform"    # how sigma_r and sigma_s are drawn from their ranges
    seed: int = 0
    log_every: int = 25                    # loss read back (the only host sync), time limit checked
    eval_every: int = 500                  # held-out PSNR of the EMA weights (0: never)
    checkpoint_every: int = 1000
    eval_crop: int = 256
    eval_noise: tuple[float, float] = (0.05, 0.10)   # (sigma_r, sigma_s) of the held-out metric
    time_map: str = "true"                 # "true" (DESIGN.md §1.4) or "observed" (as inference builds it)
    init: str = ""                         # a model file whose weights start the run ("" = random)

    def __post_init__(self):
        for name in ("sigma_r", "sigma_s", "eval_noise"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        preset(self.preset, parametrisation=self.parametrisation)   # validates both
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.time_map not in TIME_MAPS:
            raise ValueError(f"time_map must be one of {TIME_MAPS}, got {self.time_map!r}")
        if self.time_map == "observed" and self.scheme == "baseline":
            raise ValueError("time_map='observed' applies to the svnr schemes; the baseline has a constant time map")
        if self.noise_distribution not in NOISE_DISTRIBUTIONS:
            raise ValueError(f"noise_distribution must be one of {NOISE_DISTRIBUTIONS}, got {self.noise_distribution!r}")
        for name in ("sigma_r", "sigma_s"):
            low, high = getattr(self, name)
            if not 0 <= low <= high or (self.noise_distribution == "log-uniform" and low == 0):
                raise ValueError(f"{name} must be a range 0 <= low <= high (low > 0 for log-uniform), got {(low, high)}")
        for name in ("steps", "batch_size", "crop", "log_every", "checkpoint_every", "eval_crop"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0 or self.warmup_steps < 0:
            raise ValueError("eval_every and warmup_steps must be >= 0")
        if not (self.lr > 0 and 0 < self.final_lr_ratio <= 1 and self.grad_clip > 0 and 0 <= self.ema_decay < 1):
            raise ValueError("need lr > 0, 0 < final_lr_ratio <= 1, grad_clip > 0 and 0 <= ema_decay < 1")

    def model_config(self) -> UNetConfig:
        return preset(self.preset, parametrisation=self.parametrisation)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        values = json.loads(text)
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)} (written by a newer svnr_fast?)")
        return cls(**values)


class World(NamedTuple):
    rank: int = 0
    size: int = 1


# ---------------------------------------------------------------------------------------------------
# Samples and loss
# ---------------------------------------------------------------------------------------------------

def stream_seed(*keys: int) -> int:
    """A seed in [0, 2**63) that mixes the keys (statistically independent streams for distinct keys)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _uniform(generator: torch.Generator, n: int, low: float, high: float, log: bool, device) -> torch.Tensor:
    r = torch.rand(n, generator=generator, device=device)
    if log:
        return torch.exp(math.log(low) + (math.log(high) - math.log(low)) * r)
    return low + (high - low) * r


def poisson_gaussian(x0: torch.Tensor, sigma_r: torch.Tensor, sigma_s: torch.Tensor,
                     eps: torch.Tensor) -> torch.Tensor:
    """y = x0 + sqrt(sigma_r^2 + sigma_s^2 max(x0, 0)) eps (DESIGN.md §1.1) with (B,) parameters.

    `svnr_fast.PoissonGaussian` computes the same but validates its parameters' values, which reads
    them back from the device; training draws them itself and must not synchronise.
    """
    sr, ss = sigma_r.view(-1, 1, 1, 1), sigma_s.view(-1, 1, 1, 1)
    return x0 + (sr**2 + ss**2 * x0.clamp_min(0)).sqrt() * eps


class Sample(NamedTuple):
    condition: torch.Tensor   # y' (svnr schemes) or the observed y (baseline)
    x_t: torch.Tensor
    tau: torch.Tensor         # (B, 1, H, W)
    eps: torch.Tensor         # the noise of x_t: (x_t - x0) / sqrt(gamma(tau)), 0 where gamma(tau) = 0


def make_sample(model: SVNRUNet, x0: torch.Tensor, config: TrainConfig, step: int, rank: int) -> Sample:
    """The training sample of `step` on `rank` for the clean batch x0 (B, C, H, W)."""
    B, device = x0.shape[0], x0.device
    generator = torch.Generator(device=device).manual_seed(stream_seed(config.seed, step, rank, _NOISE_STREAM))
    log = config.noise_distribution == "log-uniform"
    sigma_r = _uniform(generator, B, *config.sigma_r, log, device)
    sigma_s = _uniform(generator, B, *config.sigma_s, log, device)
    if config.scheme == "baseline":
        T = model.schedule.T
        tau = (torch.rand(B, generator=generator, device=device) * T).view(B, 1, 1, 1).expand(B, 1, *x0.shape[2:])
        tau = tau.contiguous()
        eps_y = torch.randn(x0.shape, generator=generator, device=device)
        eps = torch.randn(x0.shape, generator=generator, device=device)
        x_t = x0 + model.gamma(tau).sqrt() * eps
        return Sample(poisson_gaussian(x0, sigma_r, sigma_s, eps_y), x_t, tau, eps)
    u = torch.rand(B, generator=generator, device=device)
    if config.time_map == "observed":
        return observed_sample(model, x0, sigma_r, sigma_s, u, config.scheme == "svnr", generator)
    kernel_seed = stream_seed(config.seed, step, rank, _NOISE_STREAM, 1)
    y, x_t, tau, eps = torch.ops.svnr.training_sample(x0, sigma_r, sigma_s, u, model.variance_table,
                                                      config.scheme == "svnr", None, None, kernel_seed, 0, False,
                                                      False, 0.0)
    return Sample(y, x_t, tau, eps)


def observed_input(x0: torch.Tensor, sigma_r: torch.Tensor, sigma_s: torch.Tensor, table: torch.Tensor,
                   noise: torch.Tensor, top_up: torch.Tensor):
    """(y', tau*) as inference builds them (DESIGN.md §1.3) from an observation y = x0 + noise:
    V = sigma_r^2 + sigma_s^2 clip(y, 0, 1), tau* = tau(max_c V), y' = y + sqrt(max(gamma(tau*) - V_c, 0)) z."""
    y = poisson_gaussian(x0, sigma_r, sigma_s, noise)
    variance = sigma_r.view(-1, 1, 1, 1) ** 2 + sigma_s.view(-1, 1, 1, 1) ** 2 * y.clamp(0, 1)
    tau_star = torch.ops.svnr.time_map(variance, table)
    g_star = torch.ops.svnr.gamma(tau_star, table)
    return y + (g_star - variance).clamp_min(0).sqrt() * top_up, tau_star


def observed_sample(model: SVNRUNet, x0: torch.Tensor, sigma_r: torch.Tensor, sigma_s: torch.Tensor,
                    u: torch.Tensor, correlated: bool, generator: torch.Generator) -> Sample:
    """A training sample whose condition and time map are built as inference builds them.

    DESIGN.md §1.4 computes tau* from the clean image's variance, so the time map is an exact function
    of x0 (per pixel, through max_c x0), and a network with per-pixel time conditioning learns to read
    the clean image from it: the bundled model's first version, trained that way, reached 32.0 dB held out
    with the clean image's time map and 24.1 dB with the map inference can compute from the noisy photo
    (astronaut, (0.05, 0.10), one step). Here y is a noisy observation, the time map and the top-up
    come from it exactly as at inference (`observed_input`), and x_t is the bridge sample between x0 and
    that y' (reference.bridge_sample, steps 2-5 of §1.4).
    """
    noise, top_up, eps_prime = (torch.randn(x0.shape, generator=generator, device=x0.device) for _ in range(3))
    table = model.variance_table
    y_prime, tau_star = observed_input(x0, sigma_r, sigma_s, table, noise, top_up)
    x_t, tau, eps = reference.bridge_sample(x0, y_prime, tau_star, u.view(-1, 1, 1, 1), table, correlated, eps_prime)
    return Sample(y_prime, x_t, tau, eps)


def masked_mse(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the pixels where the (B, 1, H, W) mask holds (0 when none does)."""
    squared = (output - target).square() * mask
    return squared.sum() / (mask.sum() * output.shape[1]).clamp_min(1)


class NetworkOutput(nn.Module):
    """`model.network` as a module's forward, so that DistributedDataParallel sees (and syncs) the call."""

    def __init__(self, model: SVNRUNet):
        super().__init__()
        self.model = model

    def forward(self, condition, x_t, tau):
        return self.model.network(condition, x_t, tau)


# ---------------------------------------------------------------------------------------------------
# Optimiser, schedule, EMA
# ---------------------------------------------------------------------------------------------------

def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to `lr`, then a cosine decay to `lr * final_lr_ratio` at `steps`."""
    warmup = min(config.warmup_steps, config.steps // 10)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, config.steps - warmup))
    final = config.lr * config.final_lr_ratio
    return final + (config.lr - final) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    keep = [p for p in model.parameters() if p.dim() < 2]
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": keep, "weight_decay": 0.0}], lr=config.lr, **fused)


def ema_decay_at(step: int, decay: float) -> float:
    """The EMA decay, shortened early on so that the average does not remember the random init."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


# ---------------------------------------------------------------------------------------------------
# State, step
# ---------------------------------------------------------------------------------------------------

@dataclass
class TrainState:
    model: SVNRUNet
    ema: SVNRUNet
    optimizer: torch.optim.Optimizer
    step: int = 0                          # steps completed
    best_metric: float | None = None       # best held-out PSNR of the EMA weights so far


def new_state(config: TrainConfig, device, rank: int = 0) -> TrainState:
    """A freshly initialised model (seeded by config.seed), its EMA copy and optimiser.

    Also seeds this process's global RNGs (used by dropout, if any) from (config.seed, rank).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = SVNRUNet(config.model_config())
    if config.init:
        tensors, metadata = read_safetensors(config.init, MODEL_FORMAT)
        if config_from_metadata(metadata, config.init) != model.config:
            raise CheckpointError(f"{config.init}: --init model has another architecture than --preset "
                                  f"{config.preset} / --parametrisation {config.parametrisation}")
        load_weights(model, tensors, config.init)
    process_seed = stream_seed(config.seed, rank)
    torch.manual_seed(process_seed)
    random.seed(process_seed)
    np.random.seed(process_seed % 2**32)
    model.to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    return TrainState(model, ema, make_optimizer(model, config))


def train_step(state: TrainState, network: nn.Module, x0: torch.Tensor, config: TrainConfig,
               rank: int = 0) -> torch.Tensor:
    """One optimiser step on the clean batch x0; returns the loss as a device tensor (no sync)."""
    model, step = state.model, state.step
    for group in state.optimizer.param_groups:
        group["lr"] = lr_at(step, config)
    sample = make_sample(model, x0, config, step, rank)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x0.is_cuda):
        output = network(sample.condition, sample.x_t, sample.tau)
    target, mask = model.network_target(x0, sample.x_t, sample.tau, sample.eps)
    loss = masked_mse(output.float(), target, mask)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    state.optimizer.step()
    update_ema(state.ema, model, ema_decay_at(step, config.ema_decay))
    state.step += 1
    return loss.detach()


# ---------------------------------------------------------------------------------------------------
# Held-out metric
# ---------------------------------------------------------------------------------------------------

def psnr(x: torch.Tensor, reference: torch.Tensor) -> float:
    mse = (x.clamp(0, 1).double() - reference.double()).square().mean().item()
    return 10 * math.log10(1 / max(mse, 1e-20))


@torch.no_grad()
def heldout_psnr(model: SVNRUNet, crops: list[torch.Tensor], scheme: str, noise=(0.05, 0.10),
                 seed: int = 0) -> tuple[float, float]:
    """(PSNR of the noisy photo y, PSNR of the single-step x0_hat), averaged over the held-out crops.

    svnr schemes: y' and tau* are built from y as inference builds them (`observed_input`: the time map
    from the noisy photo, not from the clean one), and x0_hat comes from one evaluation at (y', y', tau*).
    baseline: x0_hat comes from one evaluation at tau = T from x_T = 0.5 + sqrt(gamma(T)) z, conditioned
    on y. Noise is fixed by `seed`.
    """
    was_training = model.training
    model.eval()
    device = model.variance_table.device
    noisy_total = denoised_total = 0.0
    for i, crop in enumerate(crops):
        x0 = crop.to(device)[None]
        sigma_r = torch.full((1,), float(noise[0]), device=device)
        sigma_s = torch.full((1,), float(noise[1]), device=device)
        generator = torch.Generator(device=device).manual_seed(stream_seed(seed, i, _EVAL_STREAM))
        eps_y, z = (torch.randn(x0.shape, generator=generator, device=device) for _ in range(2))
        y = poisson_gaussian(x0, sigma_r, sigma_s, eps_y)
        if scheme == "baseline":
            tau = torch.full_like(x0[:, :1], float(model.schedule.T))
            x0_hat = model.predict(y, 0.5 + model.gamma(tau).sqrt() * z, tau).x0_hat
        else:
            y_prime, tau_star = observed_input(x0, sigma_r, sigma_s, model.variance_table, eps_y, z)
            x0_hat = model.predict(y_prime, y_prime, tau_star).x0_hat
        noisy_total += psnr(y, x0)
        denoised_total += psnr(x0_hat, x0)
    model.train(was_training)
    return noisy_total / len(crops), denoised_total / len(crops)


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------

def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _gathered_rng_states(device: torch.device, world: World) -> list[dict]:
    local = _rng_state(device)
    if world.size == 1:
        return [local]
    states = [None] * world.size
    dist.all_gather_object(states, local)
    return states


def save_checkpoint(path, state: TrainState, config: TrainConfig, world: World = World(),
                    extra_metadata: dict[str, str] | None = None) -> None:
    """Model, EMA, optimiser, step, the RNG states of every rank and both configs, written atomically.

    Collective under DDP (every rank calls it; rank 0 writes). `extra_metadata`: more str -> str entries.
    """
    device = state.model.variance_table.device
    rng_states = _gathered_rng_states(device, world)
    if world.rank != 0:
        return
    tensors = {f"model.{k}": v for k, v in state.model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in state.ema.state_dict().items()})
    optimizer_state = state.optimizer.state_dict()
    for index, values in optimizer_state["state"].items():
        for key, value in values.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value)
    rng_meta = []
    for rank, rng in enumerate(rng_states):
        tensors[f"rng.{rank}.torch"] = rng["torch"]
        if "cuda" in rng:
            tensors[f"rng.{rank}.cuda"] = rng["cuda"]
        numpy_state = rng["numpy"]
        tensors[f"rng.{rank}.numpy"] = torch.from_numpy(numpy_state[1].astype(np.int64))
        rng_meta.append({"python": [rng["python"][0], list(rng["python"][1]), rng["python"][2]],
                         "numpy": [numpy_state[0], *[v for v in numpy_state[2:]]]})
    metadata = {"format": CHECKPOINT_FORMAT, "model_config": state.model.config.to_json(),
                "train_config": config.to_json(), "step": str(state.step),
                "best_metric": json.dumps(state.best_metric), "rng": json.dumps(rng_meta),
                **(extra_metadata or {})}
    atomic_save(tensors, metadata, path)


def read_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict[str, str], TrainConfig]:
    """(tensors, metadata, training config) of a checkpoint; CheckpointError for anything else."""
    tensors, metadata = read_safetensors(path, CHECKPOINT_FORMAT)
    try:
        config = TrainConfig.from_json(metadata["train_config"])
        int(metadata["step"])
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: the training state stored in the checkpoint is missing or invalid ({err})") \
            from err
    return tensors, metadata, config


def load_checkpoint(path, config: TrainConfig, device, world: World = World()) -> TrainState:
    """The training state saved at `path`, for a run with `config` (which must describe the same model)."""
    tensors, metadata, _ = read_checkpoint(path)
    saved = config_from_metadata(metadata, path)
    if saved != config.model_config():
        raise CheckpointError(f"{path} holds a different model (preset/parametrisation) than this run asks for: "
                              f"saved {saved}, asked {config.model_config()}; resume with the options it was "
                              "started with, or start a new run in another folder")
    state = new_state(config, device, world.rank)

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    load_weights(state.model, part("model."), path)
    load_weights(state.ema, part("ema."), path)
    optimizer_state: dict = {}
    for key, value in part("optimizer.").items():
        index, name = key.split(".", 1)
        optimizer_state.setdefault(int(index), {})[name] = value
    if optimizer_state and set(optimizer_state) != set(range(len(list(state.model.parameters())))):
        raise CheckpointError(f"{path}: the optimiser state does not match the model's parameters")
    # the hyper-parameters come from this run (its device decides e.g. `fused`); the moments from the file
    state.optimizer.load_state_dict({"state": optimizer_state,
                                     "param_groups": state.optimizer.state_dict()["param_groups"]})
    state.step = int(metadata["step"])
    state.best_metric = json.loads(metadata.get("best_metric", "null"))
    rng_meta = json.loads(metadata.get("rng", "[]"))
    if world.rank < len(rng_meta):
        meta, prefix = rng_meta[world.rank], f"rng.{world.rank}."
        python = meta["python"]
        rng = {"torch": tensors[prefix + "torch"],
               "python": (python[0], tuple(python[1]), python[2]),
               "numpy": (meta["numpy"][0], tensors[prefix + "numpy"].numpy().astype(np.uint32), *meta["numpy"][1:])}
        if prefix + "cuda" in tensors:
            rng["cuda"] = tensors[prefix + "cuda"]
        _set_rng_state(rng, torch.device(device))
    return state


# ---------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------

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
        stop_at: int | None = None, compile_network: bool = False) -> TrainState:
    """Train from `state.step` to `config.steps`, or until step `stop_at`, `max_minutes` or a SIGINT/SIGTERM.

    Writes `run_dir/checkpoint.safetensors` every `checkpoint_every` steps and when it stops,
    `run_dir/model.safetensors` (the EMA weights) with it, `run_dir/best.safetensors` whenever the
    held-out PSNR of the EMA weights improves, and `run_dir/log.jsonl`. Under DDP every rank calls it.
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
    last = config.steps if stop_at is None else min(stop_at, config.steps)
    loader = data_lib.batch_loader(dataset, state.step, last, workers, pin_memory=device.type == "cuda")
    bar = tqdm(total=config.steps, initial=state.step, disable=not (progress and lead), dynamic_ncols=True,
               smoothing=0.05, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    started, start_step, postfix = time.monotonic(), state.step, {}
    last_check, last_check_step = started, state.step
    loss_sum, loss_count = torch.zeros((), device=device), 0
    with _StopRequest() as stop_request:
        for x0 in loader:
            loss_sum += train_step(state, network, x0.to(device, non_blocking=True), config, world.rank)
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
                save_checkpoint(run_dir / "checkpoint.safetensors", state, config, world, checkpoint_metadata)
                if lead:
                    save_model(state.ema, run_dir / "model.safetensors", {"step": str(step),
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
            save_model(state.ema, run_dir / "best.safetensors",
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
