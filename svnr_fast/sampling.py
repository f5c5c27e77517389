"""Few-step SVNR sampling (DESIGN.md §1.5): a functional sampler in the style of k-diffusion and
`SVNRScheduler` in the style of diffusers schedulers.

A *denoiser* is any callable `(condition, x, tau) -> eps_hat` with `condition` and `x` of shape
(B, C, H, W) and the per-pixel time map `tau` of shape (B, 1, H, W); svnr_fast.app.models' UNet is one.

The loop has a fixed length and calls the raw op `torch.ops.svnr.reverse_step` on arguments validated
once before it: no `.item()`, `.any()` or other host synchronisation inside, so on a GPU it runs ahead
of the host, and `sample(..., cuda_graph=...)` captures it whole in a CUDA graph (SamplerGraphs).
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import ops
from .ops import _checks
from .schedule import Schedule

Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]
StepCallback = Callable[[int, Tensor, Tensor, Tensor], None]


def default_steps(tau_star: Tensor) -> int:
    """The paper's step count: ceil(max tau*), i.e. delta = 1 for the noisiest image (one host sync)."""
    return max(1, math.ceil(float(tau_star.max())))


class StepPlan(NamedTuple):
    steps: int
    delta: Tensor        # (B,): every image of the batch ends together
    last_delta: Tensor   # (B,): the last step lands exactly on 0, whatever the rounding of steps * delta


def plan_steps(tau_start: Tensor, steps: int | None, tau_max: Tensor | None = None) -> StepPlan:
    """Equal per-image steps from `tau_max` (B,) (default: each image's largest time) down to 0."""
    if steps is None:
        steps = default_steps(tau_start if tau_max is None else tau_max)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int or None (= ceil(max tau*)), got {steps!r}")
    start = tau_start.amax(dim=(1, 2, 3)) if tau_max is None else tau_max
    start = start.to(_checks.compute_dtype(tau_start.dtype))
    return StepPlan(steps, start / steps, start)


def sample(denoiser: Denoiser, condition: Tensor, x: Tensor, tau: Tensor, table: Tensor, *, steps: int | None = None,
           eta: float = 1.0, clamp=None, seed: int = 0, callback: Optional[StepCallback] = None,
           tau_max: Optional[Tensor] = None, cuda_graph: Union[bool, "SamplerGraphs"] = False) -> Tensor:
    """Runs the reverse process from (x, tau) to time 0 in `steps` equal per-image steps.

    SVNR: `condition = x = y'` (the topped-up observation) and `tau = tau*`. The conventional baseline:
    `condition = y`, `x = 0.5 + sqrt(gamma(T)) z` and `tau = T` everywhere. `callback(i, x, tau, x0_hat)`
    sees every step (it receives x0_hat, which costs one extra write per step). `tau_max` (B,) plans the
    steps from a larger time than tau's own maximum, so that tiles of one photo all take the photo's steps.
    `cuda_graph` (CUDA tensors only): True captures the whole loop in a CUDA graph and replays it; a
    SamplerGraphs keeps the graphs for later calls of the same kind, which is where capturing pays (see
    there). The result is the one the uncaptured loop gives.
    """
    _checks.reverse_step_args(x, x, tau, 0.0, table, eta, None, clamp, seed, 0)   # validate once, not per step
    _checks.same_shape("x", x, condition=condition)
    plan = plan_steps(tau, steps, tau_max)
    low, high = _checks.clamp_range(clamp) or (None, None)
    table = table.to(_checks.compute_dtype(x.dtype))
    if cuda_graph is False:
        return _loop(denoiser, condition, x, tau, table, plan, float(eta), low, high, seed, callback)
    if cuda_graph is not True and not isinstance(cuda_graph, SamplerGraphs):
        raise TypeError(f"cuda_graph must be a bool or a SamplerGraphs, got {type(cuda_graph).__name__}")
    if callback is not None:
        raise ValueError("a callback cannot run inside a CUDA graph (the steps replay without Python); "
                         "pass cuda_graph=False to see every step")
    graphs = SamplerGraphs() if cuda_graph is True else cuda_graph
    return graphs.run(denoiser, condition, x, tau, table, plan, float(eta), low, high, seed)


def _loop(denoiser: Denoiser, condition: Tensor, x: Tensor, tau: Tensor, table: Tensor, plan: StepPlan, eta: float,
          low: float | None, high: float | None, seed: int, callback: Optional[StepCallback] = None,
          steps: int | None = None) -> Tensor:
    """The sampling loop on checked arguments (the first `steps` steps of the plan; default all of them)."""
    want_x0_hat = callback is not None
    for i in range(plan.steps if steps is None else steps):
        eps_hat = denoiser(condition, x, tau)
        delta = plan.last_delta if i == plan.steps - 1 else plan.delta
        x, tau, x0_hat = torch.ops.svnr.reverse_step(x, eps_hat, tau, delta, table, eta, None, low, high, seed, i,
                                                     want_x0_hat)
        if callback is not None:
            callback(i, x, tau, x0_hat)
    return x


def _layout(t: Tensor) -> tuple:
    return tuple(t.shape), t.stride(), t.dtype, t.device


def _owner(denoiser):
    """The module behind a denoiser: itself, or the object of a bound method such as `model.network`."""
    return getattr(denoiser, "__self__", denoiser)


def _state(denoiser) -> tuple:
    """Where a module denoiser's parameters and buffers live and their version counters: any change
    (an optimizer step, load_state_dict, .to(), train/eval) changes this. Inference tensors have no
    version counter; for them only the storage counts."""
    module = _owner(denoiser)
    if not isinstance(module, torch.nn.Module):
        return ()
    tensors = itertools.chain(module.parameters(), module.buffers())
    return (module.training, *((t.data_ptr(), -1 if t.is_inference() else t._version) for t in tensors))


class _CapturedLoop:
    """One sampling loop captured in a CUDA graph, with the static buffers it reads and the result it writes."""

    def __init__(self, denoiser: Denoiser, condition: Tensor, x: Tensor, tau: Tensor, table: Tensor, plan: StepPlan,
                 eta: float, low: float | None, high: float | None, seed: int):
        self.denoiser, self.state = denoiser, _state(denoiser)
        with torch.inference_mode(False):   # plain tensors, so later calls outside inference mode can copy into them
            self.inputs = [t.clone() for t in (condition, x, tau, plan.delta, plan.last_delta, table)]
        condition, x, tau, delta, last_delta, table = self.inputs
        static_plan = StepPlan(plan.steps, delta, last_delta)
        device = x.device
        with torch.cuda.device(device), torch.no_grad():
            # one eager step on a side stream first (torch.cuda.graph's rule): lazy initialisation and kernel
            # compilation must not happen while capturing
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                _loop(denoiser, condition, x, tau, table, static_plan, eta, low, high, seed, steps=1)
            torch.cuda.current_stream().wait_stream(side)
            # SVNRUNet caches its time tables on the first call: dropping that cache makes the capture compute
            # them into the graph's own memory, which every replay rewrites, instead of reading the warm-up's
            invalidate = getattr(_owner(denoiser), "invalidate_time_tables", None)
            if invalidate is not None:
                invalidate()
            self.graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(self.graph):
                    self.out = _loop(denoiser, condition, x, tau, table, static_plan, eta, low, high, seed)
            except RuntimeError as err:
                raise RuntimeError(f"capturing the sampling loop in a CUDA graph failed: {err}. The denoiser must "
                                   "not synchronise with the host (.item(), .cpu(), value checks, data-dependent "
                                   "shapes); pass cuda_graph=False to sample without a graph") from err

    def replay(self, condition: Tensor, x: Tensor, tau: Tensor, table: Tensor, plan: StepPlan) -> Tensor:
        for static, value in zip(self.inputs, (condition, x, tau, plan.delta, plan.last_delta, table)):
            static.copy_(value)
        self.graph.replay()
        return self.out.clone()


class SamplerGraphs:
    """CUDA graphs of the sampling loop: each captured on first use, then replayed by every later call of its kind.

    `sample(..., cuda_graph=graphs)` and `svnr_fast.denoise(..., cuda_graph=graphs)` capture the whole
    loop, every denoiser evaluation and reverse step, once per kind of call: the denoiser, the shapes,
    dtypes and layouts of the inputs, the table length, the step count, eta, clamp, CUDA autocast and,
    when eta > 0, the seed (the kernels take the seed and the per-step offsets as plain ints, which the graph bakes in;
    eta = 0 draws no noise). A replay runs the steps without Python, dispatch or launches in between.
    The inputs, the per-image step sizes and the table are copied into the graph's own buffers on every
    call, so photos of one size share a graph whatever their noise. Capturing costs about one uncaptured
    run, so a graph pays when it is replayed: many photos or tiles of one size, repeated calls.

    A replay reads the memory the capture saw. The denoiser's own tensors are safe when it is a module:
    its parameters and buffers (where they live, their version counters, train/eval) are compared before
    every replay, and a change captures again. Any other tensor a denoiser reads (a closure's tensors, a
    cache it fills on its first call) must stay where it was while these graphs are used; SVNRUNet's
    cached time tables are handled. A graph replays the kernels chosen at its capture (SVNR_FAST_BACKEND
    set later does not change them). Each graph keeps a private memory pool, about one network
    evaluation's activations: `clear()` frees them all.
    """

    def __init__(self):
        self._loops: dict[tuple, _CapturedLoop] = {}

    def __len__(self) -> int:
        return len(self._loops)

    def clear(self) -> None:
        self._loops.clear()

    def run(self, denoiser: Denoiser, condition: Tensor, x: Tensor, tau: Tensor, table: Tensor, plan: StepPlan,
            eta: float, low: float | None, high: float | None, seed: int) -> Tensor:
        """sample() on checked arguments, through the graph of this kind of call (captured first if needed)."""
        if x.device.type != "cuda":
            raise ValueError(f"cuda_graph needs CUDA tensors, but x is on {x.device}; pass cuda_graph=False "
                             "(on the CPU there is no graph to capture)")
        # a bound method is a new object at every attribute access: key it by its object and function
        # autocast changes the kernels the denoiser runs, so a graph captured under it is another kind
        autocast = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda")
        key = (id(_owner(denoiser)), getattr(denoiser, "__func__", None), _layout(condition), _layout(x), _layout(tau),
               _layout(table), plan.steps, eta, low, high, seed if eta > 0 else None, autocast)
        loop = self._loops.get(key)
        if loop is None or loop.state != _state(denoiser):
            self._loops.pop(key, None)
            del loop   # with the dict's, the last reference to the old graph: its memory goes before the capture
            loop = self._loops[key] = _CapturedLoop(denoiser, condition, x, tau, table, plan, eta, low, high, seed)
        return loop.replay(condition, x, tau, table, plan)


def sample_baseline(denoiser: Denoiser, y: Tensor, table: Tensor, *, steps: int | None = None, seed: int = 0,
                    **kwargs) -> Tensor:
    """The conventional conditional model: from x_T = 0.5 + sqrt(gamma(T)) z over all T steps (or `steps`)."""
    T = table.numel() - 1
    gen = torch.Generator(device=y.device).manual_seed(seed)
    z = torch.randn(y.shape, generator=gen, device=y.device, dtype=_checks.compute_dtype(y.dtype))
    x_T = (0.5 + table[-1].to(z.dtype).sqrt() * z).to(y.dtype)
    tau = torch.full((y.shape[0], 1, *y.shape[2:]), float(T), dtype=_checks.compute_dtype(y.dtype), device=y.device)
    return sample(denoiser, y, x_T, tau, table, steps=T if steps is None else steps, seed=seed + 1, **kwargs)


@dataclass
class SVNRSchedulerOutput:
    prev_sample: Tensor          # x at the next (smaller) per-pixel time
    tau: Tensor                  # that time map
    pred_original_sample: Tensor  # x0_hat


class SVNRScheduler:
    """A diffusers-style scheduler for per-pixel times.

    ```
    scheduler = SVNRScheduler()
    y_prime, tau = svnr_fast.ops.top_up(y, variance, scheduler.table)         # DESIGN.md §1.3
    scheduler.set_timesteps(None, tau)                                         # ceil(max tau*) steps
    x = y_prime
    for _ in scheduler.timesteps:
        out = scheduler.step(model(y_prime, x, tau), tau, x)
        x, tau = out.prev_sample, out.tau
    ```
    """

    config_name = "scheduler_config.json"

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 lam: float = 5.0, eta: float = 1.0, clip_sample: bool = False, clip_range: tuple = (0.0, 1.0),
                 seed: int = 0):
        self.schedule = Schedule(num_train_timesteps, beta_start, beta_end, lam)
        _checks.scalar("eta", eta, low=0.0, high=1.0)
        _checks.clamp_range(clip_range)
        self.config = {"num_train_timesteps": num_train_timesteps, "beta_start": beta_start, "beta_end": beta_end,
                       "lam": lam, "eta": eta, "clip_sample": bool(clip_sample),
                       "clip_range": [float(v) for v in clip_range], "seed": seed}
        self.timesteps: list[int] = []
        self._plan: StepPlan | None = None
        self._step_index = 0
        self._tables: dict[tuple, Tensor] = {}   # the table per (device, compute dtype): one copy, not one per step

    # -- config round trip ------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict) -> "SVNRScheduler":
        known = {k: v for k, v in config.items() if not k.startswith("_")}
        return cls(**known)

    def save_config(self, directory) -> Path:
        path = Path(directory) / self.config_name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"_class_name": type(self).__name__, **self.config}, indent=2))
        return path

    @classmethod
    def from_pretrained(cls, directory) -> "SVNRScheduler":
        path = Path(directory) / cls.config_name
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read a scheduler config from {path}: {err}") from None
        return cls.from_config(config)

    # -- sampling ---------------------------------------------------------------------------------
    @property
    def table(self) -> Tensor:
        return self.schedule.table

    def set_timesteps(self, num_inference_steps: int | None, tau_star: Tensor, device=None) -> None:
        """Plans `num_inference_steps` (None: ceil(max tau*)) equal per-image steps from `tau_star`."""
        _checks.tensor("tau_star", tau_star, ndim=4)
        if device is not None:
            tau_star = tau_star.to(device)
        self._plan = plan_steps(tau_star, num_inference_steps)
        self.timesteps = list(range(self._plan.steps))
        self._step_index = 0

    def step(self, model_output: Tensor, tau: Tensor, sample: Tensor, *, return_dict: bool = True):
        """One step: eps_hat = model_output at the per-pixel times `tau` of `sample`."""
        if self._plan is None:
            raise RuntimeError("call set_timesteps(num_inference_steps, tau_star) before step()")
        if self._step_index >= self._plan.steps:
            raise RuntimeError(f"all {self._plan.steps} planned steps were taken; call set_timesteps again")
        last = self._step_index == self._plan.steps - 1
        _checks.tensor("sample", sample, ndim=4)
        key = (sample.device, _checks.compute_dtype(sample.dtype))
        delta = (self._plan.last_delta if last else self._plan.delta).to(*key)
        if delta.shape[0] != sample.shape[0]:
            raise ValueError(f"the steps were planned for {delta.shape[0]} images, but sample has {sample.shape[0]}; "
                             "call set_timesteps with this batch's tau_star")
        clamp = tuple(self.config["clip_range"]) if self.config["clip_sample"] else None
        if key not in self._tables:
            self._tables[key] = self.table.to(*key)
        table, eta, seed = self._tables[key], self.config["eta"], self.config["seed"]
        if self._step_index == 0:
            # values (NaN/inf, the table, delta) once per plan, as sample() checks them before its loop: a
            # value check reads the data, which on a GPU stalls the host in every step
            _checks.reverse_step_args(sample, model_output, tau, delta, table, eta, None, clamp, seed, 0)
        else:
            _checks.tensor("model_output", model_output, ndim=4)
            _checks.same_shape("sample", sample, model_output=model_output)
            _checks.same_device("sample", sample, model_output=model_output, tau=tau)
            _checks.time_map_shape("tau", tau, "sample", sample)
        low, high = clamp or (None, None)
        x, tau_new, x0_hat = torch.ops.svnr.reverse_step(sample, model_output, tau, delta, table, float(eta), None, low,
                                                         high, seed, self._step_index, True)
        self._step_index += 1
        if not return_dict:
            return x, tau_new, x0_hat
        return SVNRSchedulerOutput(x, tau_new, x0_hat)

    def add_noise(self, original_samples: Tensor, noise: Tensor, tau: Tensor) -> Tensor:
        """The forward process at per-pixel times: x0 + sqrt(gamma(tau)) * noise."""
        _checks.same_shape("original_samples", original_samples, noise=noise)
        g = ops.gamma(tau, self.table.to(tau.device))
        return (original_samples + g.sqrt() * noise).to(original_samples.dtype)

    def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
        return sample

    def __len__(self) -> int:
        return self.config["num_train_timesteps"]
