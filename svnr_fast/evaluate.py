"""`svnr eval`: SVNR against the conventional diffusion baseline, the no-correlation ablation and
classical denoisers, on clean photos noised synthetically (the claims of the paper, issue 7).

Data. `--data DIR` is a folder of clean photos (searched recursively), or a dataset root with train/
and heldout/ subfolders (as scripts/make_dataset.py writes), of which heldout/ is used; a single image
file works too. Gray photos are repeated to RGB. Each photo is centre-cropped to at most `crop` x `crop`
pixels (0: whole photos), which bounds the run time on a CPU. For every photo and level
(sigma_r, sigma_s) the noise is Poisson-Gaussian (DESIGN.md §1.1, not clipped), drawn from a seed made
of `--seed`, the photo's name and the level, so a photo's noisy version does not depend on which other
photos, levels or methods are evaluated.

Noise parameters. Methods that need (sigma_r, sigma_s) (SVNR, the ablation, x0hat, the classical
denoisers) get the ones estimated from the noisy photo (svnr_fast.noise_estimation; `--noise estimated`,
the default: what a user has) or the true level (`--noise true`). The baseline needs none: it is
conditioned on the noisy photo itself.

Methods (`--methods`; each is skipped, with the reason printed, when its model or package is missing):
- `noisy`: the noisy input itself.
- `svnr`: top-up y' and time map tau* (DESIGN.md §1.3), then the sampler from (y', tau*) with the
  paper's ceil(max tau*) steps (per photo), eta = 1; `svnr-N`: N steps. x0_hat is clamped to [0, 1]
  at every step, as in `svnr denoise`.
- `x0hat`: one network evaluation, `model.predict(y', y', tau*).x0_hat`, clamped to [0, 1] (`svnr-1`
  computes the same picture through one reverse step).
- `ablation` / `ablation-N`: the model trained with `--no-correlation`, sampled exactly like SVNR
  from the same y' (so the two are compared on identical inputs).
- `baseline` (all T steps; shown as `baseline-1000` for T = 1000) / `baseline-N` (respaced to N equal
  steps): the model trained with `--baseline`, from x_T = 0.5 + sqrt(gamma(T)) z with the observed y
  as the condition (svnr_fast.sampling.sample_baseline).
- `bm3d` (only when the optional, non-commercial `bm3d` package imports; never a dependency), `nlm`
  (skimage.restoration.denoise_nl_means) and `wavelet` (skimage.restoration.denoise_wavelet): on the
  generalised-Anscombe-stabilised photo (`anscombe`, unit noise variance, so sigma = 1), mapped back
  with the closed-form exact unbiased inverse (`inverse_anscombe`).

Metrics per method, level and photo, then their mean over photos. Outputs are clipped to [0, 1]
first (what a saved photo holds; the noisy row too).
- PSNR and SSIM: skimage.metrics with data_range=1 (SSIM over RGB with channel_axis).
- HF ratio (`high_frequency_ratio`): the energy of a high-pass of the output over that of the clean
  photo. The high-pass is `H(x) = x - G_1 * x`, G_1 a Gaussian of standard deviation 1 pixel (truncated
  at 4 sigma, reflected borders, per channel), which passes mostly the top octave of frequencies; the
  energy is the sum of H(x)^2 over pixels and channels. ~1: texture kept; < 1: smoothed away; > 1:
  noise or artefacts added.
- NFE: network evaluations per photo (0 for noisy and classical rows).
- seconds: wall time per photo: a batched network call counts 1/batch of its time for each photo; the
  time of the noise estimate (when estimated) and of the top-up are added where a method uses them.

Outputs in `--out`: results.csv (the mean rows, which are also the data of the plot), per_image.csv,
results.md (setup and the table), grid-<level>.png per level (the first photo: noisy | SVNR | baseline
| ablation | best classical | clean, with whatever ran) and quality_vs_steps.svg (PSNR against NFE,
log axis, one panel per level; written by hand: matplotlib is not a dependency).

Network calls are batched across photos of the same shape (and, for `svnr`/`ablation`, the same step
count), under torch.inference_mode, through the fixed-length sampler (svnr_fast.sampling) and the
fused `svnr::reverse_step` op.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import platform
import shlex
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import reference
from .denoise import BUNDLED_MODEL, TOP_UP_OFFSET
from .sampling import default_steps, sample, sample_baseline
from .schedule import PoissonGaussian

DEFAULT_LEVELS = ((0.02, 0.05), (0.05, 0.10), (0.10, 0.20))
DEFAULT_METHODS = ("noisy", "svnr", "svnr-1", "svnr-2", "svnr-4", "svnr-8", "x0hat", "baseline", "baseline-25",
                   "ablation", "bm3d", "nlm", "wavelet")
CLASSICAL = ("bm3d", "nlm", "wavelet")
STEPPED = ("svnr", "ablation", "baseline")           # families that take a step count: svnr-8, baseline-25
MODEL_OF_FAMILY = {"svnr": "svnr", "x0hat": "svnr", "ablation": "ablation", "baseline": "baseline"}
SCHEME_OF_MODEL = {"svnr": "svnr", "ablation": "uncorrelated", "baseline": "baseline"}   # training.SCHEMES
TRAIN_FLAG = {"svnr": "", "ablation": " --no-correlation", "baseline": " --baseline"}
CLAMP = (0.0, 1.0)
HIGH_PASS_SIGMA = 1.0
GRID_MIN_WIDTH = 96     # pixels per panel in the picture grid
METHOD_CHOICES = ("noisy, svnr, svnr-N, x0hat, ablation, ablation-N, baseline, baseline-N, bm3d, nlm, wavelet "
                  "(N: network evaluations)")


# ---------------------------------------------------------------------------------------------------
# Methods and levels
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    name: str              # as in the tables: "svnr", "svnr-4", "baseline-1000", "x0hat", "nlm", ...
    family: str            # noisy | svnr | x0hat | ablation | baseline | classical
    steps: int | None      # sampler steps; None: ceil(max tau*) per photo (svnr, ablation), all T (baseline)

    @property
    def model(self) -> str | None:
        """Which model (svnr, ablation, baseline) the method runs, if any."""
        return MODEL_OF_FAMILY.get(self.family)


def parse_method(text: str) -> Method:
    name = text.strip().lower()
    if name == "noisy":
        return Method(name, "noisy", None)
    if name == "x0hat":
        return Method(name, "x0hat", 1)
    if name in CLASSICAL:
        return Method(name, "classical", None)
    family, dash, count = name.partition("-")
    if family in STEPPED:
        if not dash:
            return Method(name, family, None)
        if count.isdigit() and int(count) >= 1:
            return Method(f"{family}-{int(count)}", family, int(count))
    raise ValueError(f"unknown method {text!r}; choose from {METHOD_CHOICES}")


def parse_level(text: str) -> tuple[float, float]:
    """'SIGMA_R,SIGMA_S' -> (sigma_r, sigma_s)."""
    try:
        sigma_r, sigma_s = (float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"a noise level is SIGMA_R,SIGMA_S such as 0.05,0.10; got {text!r}") from None
    if not (math.isfinite(sigma_r) and math.isfinite(sigma_s)) or sigma_r < 0 or sigma_s < 0:
        raise ValueError(f"noise level {text!r}: sigma_r and sigma_s must be finite and >= 0")
    if sigma_r == sigma_s == 0:
        raise ValueError(f"noise level {text!r} adds no noise: there would be nothing to denoise")
    return sigma_r, sigma_s


def level_label(level: tuple[float, float]) -> str:
    return f"{level[0]:g},{level[1]:g}"


# ---------------------------------------------------------------------------------------------------
# Variance stabilisation (generalised Anscombe transform)
# ---------------------------------------------------------------------------------------------------

GAUSSIAN_ONLY = 1e-12    # sigma_s^2 below this: the noise is treated as purely Gaussian (read noise only)


def anscombe(y: np.ndarray, sigma_r: float, sigma_s: float) -> np.ndarray:
    """The generalised Anscombe transform for var(y | x) = sigma_r^2 + sigma_s^2 x (unit variance after).

    With alpha = sigma_s^2 the noise is that of y = alpha p + n, p ~ Poisson(x / alpha), n ~ N(0, sigma_r^2)
    (Murtagh, Starck & Bijaoui 1995; Makitalo & Foi 2013), and
    f(y) = (2 / alpha) sqrt(max(alpha y + 3/8 alpha^2 + sigma_r^2, 0)); f(y) = y / sigma_r when alpha = 0.
    """
    alpha = sigma_s**2
    if alpha < GAUSSIAN_ONLY:
        return y / sigma_r
    return (2 / alpha) * np.sqrt(np.maximum(alpha * y + 0.375 * alpha**2 + sigma_r**2, 0))


def inverse_anscombe(d: np.ndarray, sigma_r: float, sigma_s: float, unbiased: bool = True) -> np.ndarray:
    """Maps a (denoised) stabilised image back to the signal domain.

    unbiased=True (for denoised images): the closed-form approximation of the exact unbiased inverse of
    Makitalo & Foi ("Optimal inversion of the generalized Anscombe transformation for Poisson-Gaussian
    noise", IEEE TIP 22(1), 2013). In units of alpha = sigma_s^2, with s = sigma_r / alpha,
    I(D) = D^2/4 + sqrt(3/2)/4 D^-1 - 11/8 D^-2 + 5/8 sqrt(3/2) D^-3 - 1/8 - s^2, clipped at 0, and the
    signal is alpha I(D). It inverts E[f(y) | x] (what an ideal denoiser returns), not f(x): the algebraic
    inverse of a denoised image is biased low (Jensen). Below D = sqrt(3/2) (under f of zero
    signal) the series turns upwards, so such D are mapped to 0.
    unbiased=False: the algebraic inverse, alpha ((D/2)^2 - 3/8 - s^2), exact for f of noise-free values.
    Pure read noise (alpha = 0): y = sigma_r D, which is both.
    """
    alpha = sigma_s**2
    if alpha < GAUSSIAN_ONLY:
        return d * sigma_r
    s2 = (sigma_r / alpha) ** 2
    if not unbiased:
        return alpha * ((d / 2) ** 2 - 0.375 - s2)
    root = math.sqrt(1.5)
    safe = np.maximum(d, root)
    inverse = (safe**2 / 4 + root / 4 / safe - 11 / 8 / safe**2 + 5 / 8 * root / safe**3 - 1 / 8 - s2)
    return alpha * np.where(d < root, 0.0, np.maximum(inverse, 0.0))


# ---------------------------------------------------------------------------------------------------
# Classical denoisers
# ---------------------------------------------------------------------------------------------------

# the optional packages the classical methods need beyond scikit-image: method -> (module, why it is missing)
OPTIONAL_PACKAGES = {
    "bm3d": ("bm3d", "the optional `bm3d` package is not installed (non-commercial licence, never a dependency of "
                     "svnr_fast; `pip install bm3d` to include it)"),
    "wavelet": ("pywt", "skimage.restoration.denoise_wavelet needs PyWavelets, which is not installed "
                        "(`pip install PyWavelets` to include it)"),
}


def classical_unavailable(name: str) -> str | None:
    """Why the classical method cannot run here (None: it can)."""
    if name not in OPTIONAL_PACKAGES:
        return None
    module, reason = OPTIONAL_PACKAGES[name]
    try:
        __import__(module)
    except ImportError:
        return reason
    return None


def classical_denoise(name: str, y: np.ndarray, sigma_r: float, sigma_s: float) -> np.ndarray:
    """Denoises y (H, W, 3) float64 with a classical method on its generalised-Anscombe transform."""
    if sigma_r == sigma_s == 0:
        return y.copy()
    z = anscombe(y, sigma_r, sigma_s)           # noise of unit variance
    if name == "nlm":
        from skimage.restoration import denoise_nl_means
        # h = 0.6 sigma with fast_mode: the setting of scikit-image's own example
        d = denoise_nl_means(z, h=0.6, sigma=1.0, fast_mode=True, patch_size=5, patch_distance=6, channel_axis=-1)
    elif name == "wavelet":
        from skimage.restoration import denoise_wavelet
        d = denoise_wavelet(z, sigma=1.0, method="BayesShrink", mode="soft", channel_axis=-1, convert2ycbcr=True,
                            rescale_sigma=True)
    elif name == "bm3d":
        import bm3d
        d = bm3d.bm3d_rgb(z, 1.0)
    else:
        raise ValueError(f"unknown classical method {name!r}; choose one of {', '.join(CLASSICAL)}")
    return inverse_anscombe(np.asarray(d, dtype=np.float64), sigma_r, sigma_s)


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------

def high_pass_energy(x: np.ndarray) -> float:
    """Sum over pixels and channels of (x - G_1 * x)^2 for x (H, W, C) (see the module docstring)."""
    from skimage.filters import gaussian
    smooth = gaussian(x, sigma=HIGH_PASS_SIGMA, mode="reflect", truncate=4.0, channel_axis=-1, preserve_range=True)
    return float(np.square(x - smooth).sum())


def high_frequency_ratio(output: np.ndarray, clean: np.ndarray) -> float:
    """High-pass energy of `output` over that of `clean`, both (H, W, C): ~1 keeps texture, < 1 smooths it."""
    reference_energy = high_pass_energy(clean)
    return high_pass_energy(output) / reference_energy if reference_energy > 0 else float("nan")


def image_metrics(output: np.ndarray, clean: np.ndarray) -> dict[str, float]:
    """PSNR, SSIM and HF ratio of `output` (clipped to [0, 1]) against `clean`, both (H, W, C) float64."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    output = np.clip(output, 0.0, 1.0)
    return {"psnr": float(peak_signal_noise_ratio(clean, output, data_range=1.0)),
            "ssim": float(structural_similarity(clean, output, data_range=1.0, channel_axis=-1)),
            "hf_ratio": high_frequency_ratio(output, clean)}


def to_hwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).permute(1, 2, 0).numpy()


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------

@dataclass
class EvalImage:
    name: str
    clean: torch.Tensor     # (3, H, W) float32 in [0, 1], on the CPU


def image_files(data: Path) -> tuple[list[Path], Path]:
    """(the photos to evaluate, the folder they come from): heldout/ of a dataset root, else `data` itself."""
    from .data import find_images, split_folder
    data = Path(data)
    if data.is_file():
        return [data], data.parent
    if not data.is_dir():
        raise FileNotFoundError(f"no folder or image at {data}")
    _, heldout = split_folder(data)
    folder = heldout or data
    return find_images(folder), folder


def centre_crop(image: torch.Tensor, crop: int) -> torch.Tensor:
    """The central min(crop, H) x min(crop, W) pixels (crop 0: the whole image)."""
    if crop == 0:
        return image
    H, W = image.shape[-2:]
    h, w = min(crop, H), min(crop, W)
    top, left = (H - h) // 2, (W - w) // 2
    return image[:, top:top + h, left:left + w].contiguous()


def load_images(files: list[Path], folder: Path, crop: int, limit: int | None = None) -> list[EvalImage]:
    """The photos (named by their path below `folder`, without suffix), centre-cropped to `crop`."""
    from .data import load_rgb
    files = files[:limit] if limit else files
    images = []
    for path in files:
        name = path.relative_to(folder).with_suffix("").as_posix()
        image = centre_crop(load_rgb(path), crop)
        if min(image.shape[-2:]) < 8:
            raise ValueError(f"{path} is smaller than 8x8 pixels after cropping; leave it out of the folder")
        images.append(EvalImage(name, image))
    return images


def noise_seed(seed: int, name: str, level: tuple[float, float], stream: int = 0) -> int:
    """A seed in [0, 2**63) made of (seed, photo name, level, stream): independent of what else is evaluated."""
    words = [seed, zlib.crc32(name.encode()), round(level[0] * 1e6), round(level[1] * 1e6), stream]
    state = np.random.SeedSequence(words).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    model: torch.nn.Module
    path: Path
    note: str          # what the file says about itself (training scheme, step, held-out PSNR)


def _training_record(path: Path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def load_eval_model(path: Path, role: str, device: torch.device) -> LoadedModel:
    """The model for `role` (svnr, ablation, baseline); its file must not record another training scheme."""
    from .models import load_model
    model = load_model(path, device)
    if model.config.image_channels != 3:
        raise ValueError(f"{path}: the model takes {model.config.image_channels} channels; svnr eval uses RGB photos")
    metadata = _training_record(path)
    try:
        scheme = json.loads(metadata["train_config"])["scheme"]
    except (KeyError, ValueError, TypeError):
        return LoadedModel(model, path, "no training record in the file")
    if scheme != SCHEME_OF_MODEL[role]:
        raise ValueError(f"{path} was trained with scheme {scheme!r}, but --{role} needs a model trained with "
                         f"`svnr train{TRAIN_FLAG[role]}` (scheme {SCHEME_OF_MODEL[role]!r})")
    parts = [f"scheme {scheme}"] + [f"{key} {metadata[key]}" for key in ("step", "heldout_psnr") if key in metadata]
    return LoadedModel(model, path, ", ".join(parts))


def resolve_methods(requested: list[Method], models: dict[str, torch.nn.Module],
                    missing_model: dict[str, str]) -> tuple[list[Method], list[tuple[str, str]]]:
    """(the methods that can run, in order and without repeats; (name, reason) of those skipped).

    `baseline` becomes `baseline-T`; a step count above the model's T is an error.
    """
    runnable, skipped, seen = [], [], set()
    for method in requested:
        role = method.model
        if role is not None and role not in models:
            entry = (method.name, missing_model[role])
        else:
            reason = classical_unavailable(method.name) if method.family == "classical" else None
            entry = (method.name, reason) if reason else None
        if role == "baseline" and entry is None:
            T = models[role].schedule.T
            if method.steps is None:
                method = Method(f"baseline-{T}", "baseline", T)
            elif method.steps > T:
                raise ValueError(f"{method.name}: the baseline model has T = {T} steps; ask for at most baseline-{T}")
        if method.name in seen:
            continue
        seen.add(method.name)
        if entry is None:
            runnable.append(method)
        else:
            skipped.append(entry)
    return runnable, skipped


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------

@dataclass
class Observation:
    """One photo at one level."""
    noisy: torch.Tensor                       # (1, 3, H, W) on the device
    noise: tuple[float, float]                # the (sigma_r, sigma_s) the methods are given
    estimate_seconds: float                   # 0 when the true level is given
    top_ups: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)
    # model role -> (y', tau*, seconds) for the svnr-type models


@dataclass
class Task:
    level: int
    method: Method
    images: list[int]       # photo indices of one batch of equal shapes
    steps: int              # network evaluations per photo (0: no network)


@dataclass
class Evaluation:
    levels: list[tuple[float, float]]
    methods: list[Method]
    images: list[EvalImage]
    rows: list[dict]                                     # one per (level, method, photo)
    first_outputs: dict[tuple[int, str], torch.Tensor]   # (level index, method) -> (3, H, W) of photo 0
    seconds: float


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def estimated_noise(noisy: torch.Tensor, name: str) -> tuple[float, float]:
    """(sigma_r, sigma_s) estimated from one noisy photo (3, H, W); small crops are fitted on 2 intensity bins."""
    from .noise_estimation import estimate_noise
    try:
        estimate = estimate_noise(noisy)
    except ValueError:
        try:
            estimate = estimate_noise(noisy, bins=2, min_windows=8)
        except ValueError as err:
            raise ValueError(f"{name}: {err}; evaluate with --noise true or a larger --crop") from None
    return estimate.sigma_r, estimate.sigma_s


def observe(images: list[EvalImage], level: tuple[float, float], models: dict[str, torch.nn.Module], *,
            seed: int, noise: str, device: torch.device) -> list[Observation]:
    """Noisy photos, their noise parameters and, per svnr-type model, the top-up y' and time map tau*."""
    observations = []
    for image in images:
        generator = torch.Generator().manual_seed(noise_seed(seed, image.name, level))
        noisy = PoissonGaussian(*level).sample(image.clean[None], generator=generator).to(device)
        start = time.perf_counter()
        if noise == "estimated":
            params = estimated_noise(noisy[0], image.name)
        else:
            params = level
        observation = Observation(noisy, params, time.perf_counter() - start if noise == "estimated" else 0.0)
        for role in ("svnr", "ablation"):
            if role not in models:
                continue
            start = time.perf_counter()
            table = models[role].variance_table
            variance = PoissonGaussian(*params).variance(noisy.clamp(0, 1))
            y_prime, tau_star = reference.top_up(noisy, variance, table, seed=noise_seed(seed, image.name, level, 1),
                                                 offset=TOP_UP_OFFSET)
            _synchronize(device)
            observation.top_ups[role] = (y_prime, tau_star, time.perf_counter() - start)
        observations.append(observation)
    return observations


def plan(levels_observed: list[list[Observation]], methods: list[Method], batch: int) -> list[Task]:
    """The batches to run: photos of equal shape (and, for ceil(max tau*) sampling, equal steps) together."""
    tasks = []
    for level, observations in enumerate(levels_observed):
        for method in methods:
            if method.family in ("noisy", "classical"):
                tasks += [Task(level, method, [i], 0) for i in range(len(observations))]
                continue
            groups: dict[tuple, list[int]] = {}
            for i, observation in enumerate(observations):
                steps = method.steps
                if steps is None:
                    steps = default_steps(observation.top_ups[method.model][1])
                groups.setdefault((tuple(observation.noisy.shape), steps), []).append(i)
            for (_, steps), members in groups.items():
                tasks += [Task(level, method, members[k:k + batch], steps) for k in range(0, len(members), batch)]
    return tasks


def run_task(task: Task, observations: list[Observation], models: dict[str, torch.nn.Module], *, eta: float,
             seed: int, device: torch.device, on_network_call) -> tuple[torch.Tensor, float]:
    """(outputs (B, 3, H, W) on the CPU, seconds for the whole batch) of one task.

    `seed` drives the sampler's noise: the evaluation gives every method the same seed for the same batch,
    so SVNR and the ablation, which also start from the same y', are compared on identical draws.
    """
    method = task.method
    members = [observations[i] for i in task.images]
    if method.family == "noisy":
        return members[0].noisy.cpu(), 0.0
    if method.family == "classical":
        start = time.perf_counter()
        out = classical_denoise(method.name, to_hwc(members[0].noisy[0]), *members[0].noise)
        seconds = time.perf_counter() - start
        return torch.from_numpy(out).permute(2, 0, 1)[None].float(), seconds
    model = models[method.model]

    def network(condition, x, tau):
        on_network_call()
        return model(condition, x, tau)

    table = model.variance_table
    _synchronize(device)
    start = time.perf_counter()
    if method.family == "baseline":
        y = torch.cat([m.noisy for m in members])
        out = sample_baseline(network, y, table, steps=task.steps, eta=eta, clamp=CLAMP, seed=seed)
    else:
        y_prime = torch.cat([m.top_ups[method.model][0] for m in members])
        tau_star = torch.cat([m.top_ups[method.model][1] for m in members])
        if method.family == "x0hat":
            on_network_call()
            out = model.predict(y_prime, y_prime, tau_star).x0_hat.clamp(*CLAMP)
        else:
            out = sample(network, y_prime, y_prime, tau_star, table, steps=task.steps, eta=eta, clamp=CLAMP,
                         seed=seed)
    _synchronize(device)
    return out.float().cpu(), time.perf_counter() - start


def warm_up(model: torch.nn.Module, device: torch.device) -> None:
    """One sampler step on a small input: loads kernels and caches the time tables before anything is timed."""
    side = 2 * model.config.multiple
    x = torch.full((1, 3, side, side), 0.5, device=device)
    sample(model, x, x, torch.ones((1, 1, side, side), device=device), model.variance_table, steps=1, clamp=CLAMP)
    _synchronize(device)


def overhead_seconds(method: Method, observation: Observation) -> float:
    """The per-photo time of the shared preparation a method relies on (noise estimate, top-up)."""
    if method.family in ("noisy", "baseline"):
        return 0.0
    seconds = observation.estimate_seconds
    if method.model is not None:
        seconds += observation.top_ups[method.model][2]
    return seconds


@torch.inference_mode()
def evaluate(images: list[EvalImage], levels: list[tuple[float, float]], methods: list[Method],
             models: dict[str, torch.nn.Module], *, device: torch.device = torch.device("cpu"), batch: int = 8,
             eta: float = 1.0, seed: int = 0, noise: str = "estimated", progress: bool = True) -> Evaluation:
    """Every method at every level on every photo; see the module docstring for what is measured.

    models: role ("svnr", "ablation", "baseline") -> an SVNRUNet on `device`, for the methods that need one.
    """
    from tqdm import tqdm
    if noise not in ("estimated", "true"):
        raise ValueError(f"noise must be 'estimated' or 'true', got {noise!r}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    for method in methods:
        if method.model is not None and method.model not in models:
            raise ValueError(f"method {method.name} needs the {method.model} model, which was not given")
    models = {role: models[role] for role in {m.model for m in methods} if role is not None}
    for model in models.values():   # first calls pay for lazy initialisation: keep that out of the timings
        warm_up(model, device)
    start = time.perf_counter()
    observed = [observe(images, level, models, seed=seed, noise=noise, device=device) for level in levels]
    tasks = plan(observed, methods, batch)
    # progress units: one per network call on a batch, one per classical photo
    total = sum(1 if task.method.family == "classical" else task.steps for task in tasks)
    bar = tqdm(total=total, unit="step", disable=not progress, dynamic_ncols=True)
    rows, first_outputs = [], {}
    for task in tasks:
        level = levels[task.level]
        bar.set_description(f"{task.method.name} at {level_label(level)}")
        batch_seed = noise_seed(seed, "+".join(images[i].name for i in task.images), level, 2)
        outputs, seconds = run_task(task, observed[task.level], models, eta=eta, seed=batch_seed, device=device,
                                    on_network_call=lambda: bar.update(1))
        if task.method.family == "classical":
            bar.update(1)
        for index, output in zip(task.images, outputs):
            observation = observed[task.level][index]
            image = images[index]
            if index == 0:
                first_outputs[(task.level, task.method.name)] = output.clamp(0, 1)
            rows.append({"image": image.name, "level": level_label(level), "sigma_r": level[0], "sigma_s": level[1],
                         "sigma_r_used": observation.noise[0], "sigma_s_used": observation.noise[1],
                         "method": task.method.name, "family": task.method.family,
                         **image_metrics(to_hwc(output), to_hwc(image.clean)), "nfe": task.steps,
                         "seconds": seconds / len(task.images) + overhead_seconds(task.method, observation)})
    bar.close()
    return Evaluation(list(levels), list(methods), images, rows, first_outputs, time.perf_counter() - start)


SUMMARY_COLUMNS = ("method", "family", "level", "sigma_r", "sigma_s", "images", "psnr", "ssim", "hf_ratio", "nfe",
                   "seconds")
PER_IMAGE_COLUMNS = ("image", "method", "family", "level", "sigma_r", "sigma_s", "sigma_r_used", "sigma_s_used",
                     "psnr", "ssim", "hf_ratio", "nfe", "seconds")


def summarise(evaluation: Evaluation) -> list[dict]:
    """Mean over photos per (level, method), levels in the order given, methods in the order asked."""
    summary = []
    for level in evaluation.levels:
        for method in evaluation.methods:
            rows = [r for r in evaluation.rows if r["method"] == method.name and r["level"] == level_label(level)]
            if not rows:
                continue
            mean = {key: float(np.mean([r[key] for r in rows]))
                    for key in ("psnr", "ssim", "hf_ratio", "nfe", "seconds")}
            summary.append({"method": method.name, "family": method.family, "level": level_label(level),
                            "sigma_r": level[0], "sigma_s": level[1], "images": len(rows), **mean})
    return summary


# ---------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------

def write_csv(path: Path, rows: list[dict], columns: tuple[str, ...]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def _nfe_text(nfe: float) -> str:
    return str(int(nfe)) if float(nfe).is_integer() else f"{nfe:.1f}"


def markdown_table(summary: list[dict]) -> str:
    lines = ["| method | level | PSNR | SSIM | HF ratio | NFE | seconds |", "|---|---|---:|---:|---:|---:|---:|"]
    for row in summary:
        lines.append(f"| {row['method']} | {row['level']} | {row['psnr']:.2f} | {row['ssim']:.4f} | "
                     f"{row['hf_ratio']:.3f} | {_nfe_text(row['nfe'])} | {row['seconds']:.3f} |")
    return "\n".join(lines)


def machine_description(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = (f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}")
    if device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text


def pick_grid_columns(summary: list[dict], level: str, ran: list[Method]) -> list[str]:
    """noisy | SVNR | baseline | ablation | best classical (by mean PSNR at this level), those that ran."""
    names = {m.name for m in ran}
    columns = ["noisy"] if "noisy" in names else []
    for family in ("svnr", "baseline", "ablation"):
        members = [m for m in ran if m.family == family]
        if not members:
            continue
        default = [m for m in members if m.steps is None]   # the paper's ceil(max tau*) steps
        columns.append((default or sorted(members, key=lambda m: m.steps))[-1].name)
    classical = [r for r in summary if r["level"] == level and r["family"] == "classical"]
    if classical:
        columns.append(max(classical, key=lambda r: r["psnr"])["method"])
    return columns


def write_grid(path: Path, panels: list[tuple[str, str, torch.Tensor]]) -> None:
    """Panels (title, subtitle, (3, H, W) in [0, 1]) side by side under two-line labels, as an 8-bit PNG.

    Panels narrower than GRID_MIN_WIDTH are enlarged (nearest neighbour, an integer factor) so the labels fit.
    """
    from PIL import Image, ImageDraw
    strip, gap = 28, 4
    scale = max(1, math.ceil(GRID_MIN_WIDTH / min(p.shape[2] for _, _, p in panels)))
    pictures = []
    for _, _, pixels in panels:
        array = (pixels.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        picture = Image.fromarray(array)
        pictures.append(picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST))
    height = max(p.height for p in pictures)
    canvas = Image.new("RGB", (sum(p.width for p in pictures) + gap * (len(panels) - 1), height + strip), "white")
    left = 0
    for (title, subtitle, _), picture in zip(panels, pictures):
        label = Image.new("RGB", (picture.width, strip), "white")   # drawn apart, so long labels are cut at the panel
        draw = ImageDraw.Draw(label)
        draw.text((2, 1), title, fill="black")
        draw.text((2, 14), subtitle, fill="#444444")
        canvas.paste(label, (left, 0))
        canvas.paste(picture, (left, strip))
        left += picture.width + gap
    canvas.save(path)


SERIES_COLOURS = {"svnr": "#1f77b4", "ablation": "#ff7f0e", "baseline": "#2ca02c", "x0hat": "#9467bd"}
LINE_COLOURS = {"noisy": "#000000", "bm3d": "#8c564b", "nlm": "#7f7f7f", "wavelet": "#bcbd22"}


def _nice_step(span: float) -> float:
    raw = span / 5
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)


def quality_vs_steps_svg(summary: list[dict], levels: list[tuple[float, float]]) -> str:
    """PSNR against network evaluations (log axis), one panel per level: the network methods as lines
    (svnr, ablation, baseline over their step counts; x0hat a point), noisy and classical as dashed
    horizontal lines."""
    width, height, left, right, top, bottom = 380, 280, 52, 78, 30, 42
    plot_w, plot_h = width - left - right, height - top - bottom
    legend, x = [], 10
    for label, colour in [*SERIES_COLOURS.items(), ("noisy / classical (dashed, no network)", "#555")]:
        legend.append(f'<rect x="{x}" y="{height + 6}" width="10" height="10" fill="{colour}"/>')
        legend.append(f'<text x="{x + 14}" y="{height + 15}">{label}</text>')
        x += 24 + 7 * len(label)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{max(width * len(levels), x)}" height="{height + 24}" '
           f'font-family="sans-serif" font-size="11">', '<rect width="100%" height="100%" fill="white"/>']
    max_nfe = max([r["nfe"] for r in summary] + [10])
    decades = max(1, math.ceil(math.log10(max_nfe)))
    for panel, level in enumerate(levels):
        rows = [r for r in summary if r["level"] == level_label(level)]
        if not rows:
            continue
        ox = panel * width
        low = min(r["psnr"] for r in rows)
        high = max(r["psnr"] for r in rows)
        step = _nice_step(max(high - low, 1.0))
        low, high = math.floor(low / step) * step, math.ceil(high / step) * step

        def x_of(nfe: float) -> float:
            return ox + left + plot_w * math.log10(max(nfe, 1)) / decades

        def y_of(psnr: float) -> float:
            return top + plot_h * (high - psnr) / (high - low)

        out.append(f'<text x="{ox + left + plot_w / 2}" y="18" text-anchor="middle" font-weight="bold">'
                   f'sigma_r={level[0]:g}, sigma_s={level[1]:g}</text>')
        out.append(f'<rect x="{ox + left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>')
        for k in range(decades + 1):
            x = x_of(10**k)
            out.append(f'<line x1="{x}" y1="{top}" x2="{x}" y2="{top + plot_h}" stroke="#ddd"/>')
            out.append(f'<text x="{x}" y="{top + plot_h + 14}" text-anchor="middle">{10**k}</text>')
        value = low
        while value <= high + 1e-9:
            y = y_of(value)
            out.append(f'<line x1="{ox + left}" y1="{y}" x2="{ox + left + plot_w}" y2="{y}" stroke="#eee"/>')
            out.append(f'<text x="{ox + left - 4}" y="{y + 4}" text-anchor="end">{value:g}</text>')
            value += step
        out.append(f'<text x="{ox + left + plot_w / 2}" y="{top + plot_h + 30}" text-anchor="middle">'
                   'network evaluations per photo (NFE)</text>')
        out.append(f'<text transform="translate({ox + 14},{top + plot_h / 2}) rotate(-90)" text-anchor="middle">'
                   'PSNR (dB)</text>')
        for row in rows:
            if row["nfe"] == 0:     # noisy and classical: no network, a reference line
                y = y_of(row["psnr"])
                colour = LINE_COLOURS.get(row["method"], "#999")
                out.append(f'<line x1="{ox + left}" y1="{y}" x2="{ox + left + plot_w}" y2="{y}" stroke="{colour}" '
                           'stroke-dasharray="5,3"/>')
                out.append(f'<text x="{ox + left + plot_w + 4}" y="{y + 4}" fill="{colour}">{row["method"]}</text>')
        for family, colour in SERIES_COLOURS.items():
            points = sorted((r["nfe"], r["psnr"], r["method"]) for r in rows if r["family"] == family)
            if not points:
                continue
            if len(points) > 1:
                path = " ".join(f"{x_of(n):.1f},{y_of(p):.1f}" for n, p, _ in points)
                out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
            for n, p, name in points:
                out.append(f'<circle cx="{x_of(n):.1f}" cy="{y_of(p):.1f}" r="3" fill="{colour}">'
                           f'<title>{name}: {p:.2f} dB, {_nfe_text(n)} NFE</title></circle>')
    out += legend
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_outputs(out: Path, evaluation: Evaluation, summary: list[dict], header: list[str],
                  skipped: list[tuple[str, str]]) -> list[Path]:
    """results.csv, per_image.csv, results.md, grid-<level>.png and quality_vs_steps.svg; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", summary, SUMMARY_COLUMNS)
    write_csv(out / "per_image.csv", evaluation.rows, PER_IMAGE_COLUMNS)
    files = [out / "results.csv", out / "per_image.csv"]
    first = evaluation.images[0]
    for index, level in enumerate(evaluation.levels):
        label = level_label(level)
        panels = []
        for name in pick_grid_columns(summary, label, evaluation.methods):
            row = next(r for r in evaluation.rows if r["image"] == first.name and r["level"] == label
                       and r["method"] == name)
            panels.append((name, f"{row['psnr']:.2f} dB", evaluation.first_outputs[(index, name)]))
        panels.append(("clean", first.name, first.clean))
        grid = out / f"grid-{label.replace(',', '-')}.png"
        write_grid(grid, panels)
        files.append(grid)
    (out / "quality_vs_steps.svg").write_text(quality_vs_steps_svg(summary, evaluation.levels))
    files.append(out / "quality_vs_steps.svg")
    lines = ["# svnr eval", "", *[f"- {line}" for line in header], "", markdown_table(summary), ""]
    if skipped:
        lines += ["Skipped:", "", *[f"- `{name}`: {reason}" for name, reason in skipped], ""]
    lines += ["PSNR and SSIM: scikit-image, data_range=1, outputs clipped to [0, 1]. HF ratio: energy of "
              f"x - G_{HIGH_PASS_SIGMA:g}*x (Gaussian high-pass, sigma {HIGH_PASS_SIGMA:g} px) of the output over that "
              "of the clean photo (~1 keeps texture, < 1 smooths it). NFE: network evaluations per photo. "
              "seconds: wall time per photo (batched network calls shared out over the batch).", "",
              f"Figures: {', '.join(f'[{p.name}]({p.name})' for p in files[2:])}; every photo and level in "
              "per_image.csv.", ""]
    (out / "results.md").write_text("\n".join(lines))
    files.insert(2, out / "results.md")
    return files


# ---------------------------------------------------------------------------------------------------
# svnr eval
# ---------------------------------------------------------------------------------------------------

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
    from .imageio import ImageError
    from .models import CheckpointError
    from .photo import pick_device

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


def add_eval_parser(sub) -> None:
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
