"""One training step: the sample, the loss, the optimiser with its learning-rate schedule, the EMA; and the
held-out metric printed during training."""
from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ...schedule import poisson_gaussian_sample
from .. import checkpoint
from ..conditioning import observed_input
from ..metrics import psnr
from ..models import SVNRUNet
from .config import TrainConfig

_NOISE_STREAM, _EVAL_STREAM = 0x4E015E, 0xE7A1


def stream_seed(*keys: int) -> int:
    """A seed in [0, 2**63) that mixes the keys (statistically independent streams for distinct keys)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _uniform(generator: torch.Generator, n: int, low: float, high: float, log: bool, device) -> torch.Tensor:
    r = torch.rand(n, generator=generator, device=device)
    if log:
        return torch.exp(math.log(low) + (math.log(high) - math.log(low)) * r)
    return low + (high - low) * r


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
        return Sample(poisson_gaussian_sample(x0, sigma_r, sigma_s, eps_y), x_t, tau, eps)
    u = torch.rand(B, generator=generator, device=device)
    if config.time_map == "observed":
        return observed_sample(model, x0, sigma_r, sigma_s, u, config.scheme == "svnr", generator)
    kernel_seed = stream_seed(config.seed, step, rank, _NOISE_STREAM, 1)
    y, x_t, tau, eps = torch.ops.svnr.training_sample(x0, sigma_r, sigma_s, u, model.variance_table,
                                                      config.scheme == "svnr", None, None, kernel_seed, 0, False,
                                                      False, 0.0)
    return Sample(y, x_t, tau, eps)


def observed_sample(model: SVNRUNet, x0: torch.Tensor, sigma_r: torch.Tensor, sigma_s: torch.Tensor,
                    u: torch.Tensor, correlated: bool, generator: torch.Generator) -> Sample:
    """A training sample whose condition and time map are built as inference builds them.

    DESIGN.md §1.4 computes tau* from the clean image's variance, so the time map is an exact function
    of x0 (per pixel, through max_c x0), and a network with per-pixel time conditioning learns to read
    the clean image from it: the bundled model's first version, trained that way, reached 32.0 dB held out
    with the clean image's time map and 24.1 dB with the map inference can compute from the noisy photo
    (astronaut, (0.05, 0.10), one step). Here y is a noisy observation, the time map and the top-up
    come from it exactly as at inference (`observed_input`), and x_t is the bridge sample between x0 and
    that y' (svnr::bridge_sample, steps 2-5 of §1.4).
    """
    noise, top_up, eps_prime = (torch.randn(x0.shape, generator=generator, device=x0.device) for _ in range(3))
    table = model.variance_table
    y_prime, tau_star = observed_input(x0, sigma_r, sigma_s, table, noise, top_up)
    x_t, tau, eps = torch.ops.svnr.bridge_sample(x0, y_prime, tau_star, u, table, correlated, eps_prime)
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


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to `lr`, then a cosine decay to `lr * final_lr_ratio` at `steps`."""
    warmup = min(config.warmup_steps, config.steps // 10)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, config.steps - warmup))
    final = config.lr * config.final_lr_ratio
    return final + (config.lr - final) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """Fused AdamW with its learning rate in a device tensor: the step counter and the learning rate stay on
    the device, so a step reads nothing back to the host and a CUDA graph of it replays with each step's rate."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    keep = [p for p in model.parameters() if p.dim() < 2]
    lr = torch.tensor(config.lr, device=next(model.parameters()).device)
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": keep, "weight_decay": 0.0}], lr=lr, fused=True)


def ema_decay_at(step: int, decay: float) -> float:
    """The EMA decay, shortened early on so that the average does not remember the random init."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: torch.Tensor) -> None:
    """ema <- decay * ema + (1 - decay) * model, with the decay a device tensor (no host read, capturable)."""
    ema_parameters = list(ema.parameters())
    torch._foreach_mul_(ema_parameters, decay)
    torch._foreach_add_(ema_parameters, torch._foreach_mul(list(model.parameters()), 1 - decay))


@dataclass
class TrainState:
    model: SVNRUNet
    ema: SVNRUNet
    optimizer: torch.optim.Optimizer
    step: int = 0                          # steps completed
    best_metric: float | None = None       # best held-out PSNR of the EMA weights so far
    ema_decay: torch.Tensor | None = None  # this step's EMA decay, on the device (set by set_schedule)

    def set_schedule(self, config: TrainConfig) -> None:
        """The learning rate and EMA decay of this step, written into their device tensors (no host sync)."""
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr_at(self.step, config))
        if self.ema_decay is None:
            self.ema_decay = torch.zeros((), device=self.model.variance_table.device)
        self.ema_decay.fill_(ema_decay_at(self.step, config.ema_decay))


def new_state(config: TrainConfig, device, rank: int = 0) -> TrainState:
    """A freshly initialised model (seeded by config.seed), its EMA copy and optimiser.

    Also seeds this process's global RNGs (used by dropout, if any) from (config.seed, rank).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = SVNRUNet(config.model_config())
    if config.init:
        tensors, metadata = checkpoint.read_safetensors(config.init, checkpoint.MODEL_FORMAT)
        if checkpoint.config_from_metadata(metadata, config.init) != model.config:
            raise checkpoint.CheckpointError(f"{config.init}: --init model has another architecture than --preset "
                                  f"{config.preset} / --parametrisation {config.parametrisation}")
        checkpoint.load_weights(model, tensors, config.init)
    process_seed = stream_seed(config.seed, rank)
    torch.manual_seed(process_seed)
    random.seed(process_seed)
    np.random.seed(process_seed % 2**32)
    model.to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    return TrainState(model, ema, make_optimizer(model, config))


def learn(state: TrainState, network: nn.Module, x0: torch.Tensor, sample: Sample,
          config: TrainConfig) -> torch.Tensor:
    """Everything of a step after its sample: forward, loss, backward, clipping, optimiser and EMA, on the
    device with nothing read back (so a CUDA graph can capture it). Returns the loss as a device tensor."""
    state.optimizer.zero_grad(set_to_none=True)
    # no autocast cache: a CUDA graph must not keep casts made during its capture
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x0.is_cuda, cache_enabled=False):
        output = network(sample.condition, sample.x_t, sample.tau)
    target, mask = state.model.network_target(x0, sample.x_t, sample.tau, sample.eps)
    loss = masked_mse(output.float(), target, mask)
    loss.backward()
    nn.utils.clip_grad_norm_(state.model.parameters(), config.grad_clip)
    state.optimizer.step()
    update_ema(state.ema, state.model, state.ema_decay)
    return loss.detach()


def train_step(state: TrainState, network: nn.Module, x0: torch.Tensor, config: TrainConfig, rank: int = 0,
               graph: "StepGraph | None" = None) -> torch.Tensor:
    """One optimiser step on the clean batch x0; returns the loss as a device tensor (no sync).

    With a StepGraph (CUDA) the step after its sample is replayed from a CUDA graph: the same arithmetic."""
    sample = make_sample(state.model, x0, config, state.step, rank)
    state.set_schedule(config)
    loss = learn(state, network, x0, sample, config) if graph is None else graph.learn(state, network, x0, sample,
                                                                                       config)
    state.step += 1
    return loss


class StepGraph:
    """`learn` replayed from a CUDA graph, one process, fixed batch shape.

    The sample stays eager (its noise comes from per-step seeded generators, which a graph would freeze) and
    is copied into static buffers; everything after it (~3 launches per op of the network, forward and
    backward, plus the optimiser and the EMA) replays as one graph. The first WARM_UP steps run eagerly on a
    side stream (lazy initialisation, cuDNN autotuning, the optimiser state), as CUDA graph capture requires;
    they are steps of the run like any other.
    """

    WARM_UP = 3

    def __init__(self):
        self.warmed_up = 0
        self.graph = None
        self.inputs: tuple[torch.Tensor, ...] = ()
        self.loss: torch.Tensor | None = None

    def learn(self, state: TrainState, network: nn.Module, x0: torch.Tensor, sample: Sample,
              config: TrainConfig) -> torch.Tensor:
        if self.warmed_up < self.WARM_UP:
            self.warmed_up += 1
            side = torch.cuda.Stream(x0.device)
            side.wait_stream(torch.cuda.current_stream(x0.device))
            with torch.cuda.stream(side):
                loss = learn(state, network, x0, sample, config)
            torch.cuda.current_stream(x0.device).wait_stream(side)
            return loss
        if self.graph is None:
            self.inputs = tuple(t.clone() for t in (x0, *sample))
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.loss = learn(state, network, self.inputs[0], Sample(*self.inputs[1:]), config)
        for static, value in zip(self.inputs, (x0, *sample)):
            static.copy_(value)
        self.graph.replay()
        return self.loss


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
        y = poisson_gaussian_sample(x0, sigma_r, sigma_s, eps_y)
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
