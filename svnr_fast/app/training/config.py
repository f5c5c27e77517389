"""What a training run is: its configuration (TrainConfig) and its place in a distributed run (World)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import NamedTuple

from ..models import UNetConfig, preset

SCHEMES = ("svnr", "uncorrelated", "baseline")


NOISE_DISTRIBUTIONS = ("uniform", "log-uniform")


TIME_MAPS = ("true", "observed")


# options that may change when a run is resumed; every other one is part of what the run is
RUNTIME_OPTIONS = ("steps", "log_every", "eval_every", "checkpoint_every")


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
