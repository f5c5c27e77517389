"""SVNR as a diffusers scheduler: `SVNRScheduler`, a `SchedulerMixin` + `ConfigMixin` running svnr_fast's ops.

Needs diffusers (`pip install -e ".[diffusers]"`). The standard diffusers loop runs unchanged once the
scheduler has the per-pixel time map `tau_star` of the topped-up observation `y_prime` (DESIGN.md §1.3):

    scheduler = SVNRScheduler()
    scheduler.set_timesteps(num_inference_steps, time_map=tau_star)   # None: ceil(max tau*) steps
    x = y_prime
    for t in scheduler.timesteps:
        eps_hat = model(y_prime, x, scheduler.time_map_at(t))
        x = scheduler.step(eps_hat, t, x, generator=g).prev_sample

A timestep `t` is a label of one step: the largest per-pixel time of the batch at that step (float,
decreasing); `time_map_at(t)` is the whole (B, 1, H, W) or (B, C, H, W) map the model must see. Times are
svnr's continuous times; a codebase's integer index k is svnr time `scheduler.schedule.time_from_index(k)`.

Config (saved by `save_pretrained`, JSON): the betas of a DDPM-style schedule (`num_train_timesteps`,
`beta_start`, `beta_end`, `beta_schedule` "linear" or "scaled_linear", or `trained_betas`) and SVNR's own
keys: `lam` (the variance table is `lam * (1 - alphas_cumprod)`), `eta` (1: the ancestral posterior step,
0: deterministic), `clip_sample` (clamp x0_hat to `data_range`), `data_range` (the range of the data the
model sees, e.g. [-1, 1]; the noise model applies in [0, 1], so every variance is scaled by
`(high - low)^2`), `step_plan` ("continuous": N equal per-image steps; "index": the time map snapped to
the integer grid and steps of delta = 1, see svnr_fast.conventions) and `prediction_type` (only "epsilon").

A DDPM/DDIM config is not an SVNR config: it has no lam and says nothing about the data range, so
`SVNRScheduler.from_config(ddpm.config)` refuses it until both are given
(`from_config(ddpm.config, lam=5.0, data_range=(-1, 1))`, which takes its betas). The other way round,
`DDPMScheduler.from_config(svnr.config)` is diffusers' own code: it logs a warning that lam, eta,
data_range and step_plan "are not expected and will be ignored" and builds a DDPM scheduler with the
same betas, which samples a different (variance-preserving) process.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .. import conventions, ops
from ..ops import _checks
from ..sampling import StepPlan, plan_steps
from ..schedule import Schedule

STEP_PLANS = ("continuous", "index")
SVNR_KEYS = ("lam", "data_range", "eta", "step_plan", "clip_sample")   # no diffusers scheduler reads these as SVNR does
BETA_SCHEDULES = ("linear", "scaled_linear")


@dataclass
class SVNRSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor            # x at the next (smaller) per-pixel times
    pred_original_sample: torch.Tensor   # x0_hat
    time_map: torch.Tensor               # the per-pixel times of prev_sample


def _betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str, trained_betas):
    if trained_betas is not None:
        betas = torch.as_tensor(trained_betas, dtype=torch.float64)
        if betas.dim() != 1 or betas.numel() != num_train_timesteps:
            raise ValueError(f"trained_betas must hold num_train_timesteps = {num_train_timesteps} values, got shape "
                             f"{tuple(betas.shape)}; pass num_train_timesteps={betas.numel()}")
        return betas
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES} (or pass trained_betas), got {beta_schedule!r}")


class SVNRScheduler(SchedulerMixin, ConfigMixin):
    """SVNR's per-pixel reverse process in the diffusers scheduler API (see the module docstring)."""

    order = 1
    _compatibles: list = []   # no diffusers scheduler shares SVNR's process

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Optional[list] = None, lam: float = 5.0,
                 prediction_type: str = "epsilon", eta: float = 1.0, clip_sample: bool = False,
                 data_range: tuple = (0.0, 1.0), step_plan: str = "continuous"):
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
        if prediction_type != "epsilon":
            raise ValueError(f"SVNR's reverse step takes the network's noise estimate: prediction_type must be "
                             f"'epsilon', got {prediction_type!r}")
        if step_plan not in STEP_PLANS:
            raise ValueError(f"step_plan must be one of {STEP_PLANS}, got {step_plan!r}")
        _checks.scalar("eta", eta, low=0.0, high=1.0)
        low, high = conventions.check_data_range(data_range)
        self.register_to_config(data_range=[low, high])   # JSON keeps lists: the config round-trips as saved
        # diffusers drops the keys it lists as defaults when another scheduler is built from this config, and
        # would drop SVNR's silently: never list them, so DDPMScheduler.from_config warns that it ignores them
        defaults = self.config.get("_use_default_values")
        if isinstance(defaults, list):
            self.register_to_config(_use_default_values=[key for key in defaults if key not in SVNR_KEYS])
        self.schedule = Schedule.from_betas(_betas(num_train_timesteps, beta_start, beta_end, beta_schedule,
                                                   trained_betas), lam=lam)
        # float64; each step takes it in the data's compute dtype (float32 for float32 data, as the ops do)
        self.variance_table = conventions.table_in_data_units(self.schedule.table64, (low, high))
        self.init_noise_sigma = math.sqrt(float(self.variance_table[-1]))   # the baseline's pure-noise start
        self.timesteps = torch.empty(0)
        self.num_inference_steps: int | None = None
        self._plan: StepPlan | None = None

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' from_config, refusing a config without SVNR's lam and data_range (another scheduler's)
        until they are given."""
        if isinstance(config, dict):
            missing = [key for key in ("lam", "data_range") if key not in config and key not in kwargs]
            if missing:
                source = config.get("_class_name")
                what = f"a {source} config" if source else "this config"
                raise ValueError(
                    f"{what} is not an SVNR config: it has no {' and no '.join(missing)}. SVNR's "
                    f"variance table is lam * (1 - alphas_cumprod) of its betas, with the noise model applied in "
                    f"[0, 1] to data in data_range; pass them, e.g. SVNRScheduler.from_config(config, lam=5.0, "
                    f"data_range=(-1, 1))")
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # -- planning ---------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device, None] = None,
                      time_map: Optional[torch.Tensor] = None) -> None:
        """Plans the steps from the per-pixel time map (B, 1, H, W) or (B, C, H, W) of the batch.

        step_plan "continuous": `num_inference_steps` equal per-image steps (None: ceil(max tau*), the
        paper's delta = 1 for the noisiest image). step_plan "index": the map snapped down to the integer
        grid and steps of delta = 1 (num_inference_steps must be None: the plan sets the count).
        """
        if time_map is None:
            raise ValueError("SVNR plans its steps from the per-pixel time map of the observation: call "
                             "set_timesteps(num_inference_steps, time_map=tau_star) with tau_star from "
                             "svnr_fast.ops.time_map(variance, table) or svnr_fast.reference.top_up; for the "
                             "conventional baseline pass a map filled with num_train_timesteps")
        _checks.tensor("time_map", time_map, ndim=4, dtypes=(torch.float32, torch.float64))
        if not bool((torch.isfinite(time_map) & (time_map >= 0)).all()):
            raise ValueError("time_map must hold finite times >= 0 (svnr times from time_from_variance)")
        if device is not None:
            time_map = time_map.to(device)
        if self.config.step_plan == "index":
            if num_inference_steps is not None:
                raise ValueError("step_plan 'index' takes steps of delta = 1 until every pixel is clean, so it sets "
                                 "the step count itself: pass num_inference_steps=None")
            time_map, steps = conventions.index_time_plan(time_map)
            tau_max = torch.full((time_map.shape[0],), float(steps), dtype=time_map.dtype, device=time_map.device)
            plan = plan_steps(time_map, steps, tau_max)
        else:
            plan = plan_steps(time_map, num_inference_steps)
        self._plan, self._start = plan, time_map
        self._tau, self._tau_index = time_map, 0
        self._step_tensors: dict = {}
        self.num_inference_steps = plan.steps
        # labels: the batch's largest time at each step, on the host (looking a label up never syncs a GPU)
        largest = time_map.amax(dim=(1, 2, 3)).double().cpu()
        counts = torch.arange(plan.steps, dtype=torch.float64)[:, None]
        self.timesteps = (largest[None, :] - counts * plan.delta.double().cpu()[None, :]).amax(dim=1).float()
        self._index = {value: i for i, value in enumerate(self.timesteps.tolist())}
        if len(self._index) != plan.steps:
            raise ValueError(f"{plan.steps} steps are too many to label apart in float32; plan fewer steps")
        # without a generator the kernels draw the noise from (seed, step): the seed comes from torch's global RNG
        self._seed = int(torch.randint(0, 2**62, (1,)))

    def index_for_timestep(self, timestep) -> int:
        """The step number of a label from `timesteps`."""
        if self._plan is None:
            raise RuntimeError("call set_timesteps(num_inference_steps, time_map=tau_star) first")
        value = float(timestep)
        index = self._index.get(value)
        if index is None:
            raise ValueError(f"timestep {value} is not one of this plan's timesteps; pass the values of "
                             "scheduler.timesteps (the steps' largest times), as the standard loop does")
        return index

    def time_map_at(self, timestep) -> torch.Tensor:
        """The per-pixel time map the model sees at the step labelled `timestep`."""
        return self._map(self.index_for_timestep(timestep))

    def _map(self, index: int) -> torch.Tensor:
        if index == self._tau_index:
            return self._tau
        base, tau = (self._tau_index, self._tau) if index > self._tau_index else (0, self._start)
        delta = self._plan.delta.view(-1, 1, 1, 1)
        for _ in range(index - base):
            tau = (tau - delta).clamp_min(0)   # the reverse step's own update of the time map
        return tau

    # -- stepping ---------------------------------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, return_dict: bool = True):
        """One reverse step from the step labelled `timestep`: model_output is the noise estimate eps_hat.

        With a generator the step's noise is drawn by diffusers' randn_tensor (reproducible across
        backends); without one the kernels draw it from a seed taken at set_timesteps and the step
        number. Returns SVNRSchedulerOutput(prev_sample, pred_original_sample, time_map), or that tuple.
        """
        index = self.index_for_timestep(timestep)
        tau = self._map(index)
        key = (sample.device, _checks.compute_dtype(sample.dtype))
        if key not in self._step_tensors:
            self._step_tensors[key] = (self._plan.delta.to(*key), self._plan.last_delta.to(*key),
                                       self.variance_table.to(*key))
        delta, last_delta, table = self._step_tensors[key]
        delta = last_delta if index == self._plan.steps - 1 else delta
        eta = float(self.config.eta)
        z = None
        if eta > 0 and generator is not None:
            z = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=key[1])
        clamp = tuple(self.config.data_range) if self.config.clip_sample else None
        if index == 0:
            # the values once per plan, as svnr_fast.app.sampling does: a value check on a GPU stalls the host
            _checks.reverse_step_args(sample, model_output, tau, delta, table, eta, z, clamp, self._seed, index)
        else:
            _checks.tensor("model_output", model_output, ndim=4)
            _checks.same_shape("sample", sample, model_output=model_output)
            _checks.same_device("sample", sample, model_output=model_output, tau=tau)
            _checks.time_map_shape("time_map", tau, "sample", sample, per_channel_allowed=True)
        low, high = clamp or (None, None)
        x, tau_new, x0_hat = torch.ops.svnr.reverse_step(sample, model_output, tau, delta, table, eta, z, low, high,
                                                         self._seed, index, True)
        self._tau, self._tau_index = tau_new, index + 1
        if not return_dict:
            return x, x0_hat, tau_new
        return SVNRSchedulerOutput(prev_sample=x, pred_original_sample=x0_hat, time_map=tau_new)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The forward process `x0 + sqrt(gamma(tau)) * noise` (in data units) at svnr times `timesteps`: one per
        image (B,), a scalar, or a per-pixel time map."""
        _checks.same_shape("original_samples", original_samples, noise=noise)
        dtype = _checks.compute_dtype(original_samples.dtype)
        tau = torch.as_tensor(timesteps, device=original_samples.device).to(dtype)
        if tau.dim() == 1:
            tau = tau.view(-1, 1, 1, 1)
        variance = ops.gamma(tau, self.variance_table.to(original_samples.device, dtype))
        return (original_samples.to(dtype) + variance.sqrt() * noise.to(dtype)).to(original_samples.dtype)
