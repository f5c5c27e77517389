"""Running an evaluation: the photos, their noisy observations, the models, and the batched method runs."""
from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...schedule import PoissonGaussian
from ..conditioning import observe as condition
from ..metrics import image_metrics, to_hwc
from ...sampling import default_steps, sample, sample_baseline
from .methods import (
    SCHEME_OF_MODEL,
    TRAIN_FLAG,
    Method,
    classical_denoise,
    classical_unavailable,
    level_label,
)

CLAMP = (0.0, 1.0)


@dataclass
class EvalImage:
    name: str
    clean: torch.Tensor     # (3, H, W) float32 in [0, 1], on the CPU


def image_files(data: Path) -> tuple[list[Path], Path]:
    """(the photos to evaluate, the folder they come from): heldout/ of a dataset root, else `data` itself."""
    from ..data import find_images, split_folder
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
    from ..data import load_rgb
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
    from ..checkpoint import load_model
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


@dataclass
class Observation:
    """One photo at one level."""
    noisy: torch.Tensor                       # (1, 3, H, W) on the device
    noise: tuple[float, float]                # the (sigma_r, sigma_s) the methods are given
    estimate_seconds: float                   # 0 when the true level is given
    top_ups: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)


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
    from ..noise_estimation import estimate_noise_robust
    try:
        estimate = estimate_noise_robust(noisy)
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
            y_prime, tau_star = condition(noisy, PoissonGaussian(*params), table,
                                          seed=noise_seed(seed, image.name, level, 1))
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
