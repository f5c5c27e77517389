"""The main job: a noisy photo in, a clean photo out (DESIGN.md §1.3, §1.5, §4).

1. Noise variance V = sigma_r^2 + sigma_s^2 * clip(y, 0, 1) (the clean image is unknown), with
   (sigma_r, sigma_s) given or estimated from the photo.
2. Top-up: y' = y + sqrt(gamma(tau*) - V_c) z, tau* = tau(max_c V): every channel of a pixel now has
   the variance gamma(tau*), so y' is exactly a diffusion sample at the per-pixel time tau*.
3. Sampling from (y', tau*) to time 0 in `steps` per-image steps (default ceil(max tau*)), conditioned
   on y'.
Large photos are processed in overlapping tiles. The time map, the step plan and the top-up are computed
on the whole photo, so every tile walks the same per-pixel times; tiles are blended with raised-cosine
ramps over their overlaps, so no seam shows.
On a GPU, `cuda_graph` replays the sampling loop from CUDA graphs (svnr_fast.sampling.SamplerGraphs).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from ..ops import _checks
from ..schedule import PoissonGaussian
from .conditioning import observe
from .noise_estimation import estimate_noise_model
from ..sampling import Denoiser, SamplerGraphs, default_steps, sample

NoiseSpec = Union[str, PoissonGaussian, Sequence[float]]
StepsSpec = Union[int, str, None]

# chosen by measurement on the held-out photos (README, "Defaults, and how they were chosen";
# benchmarks/results/defaults/)
DEFAULT_STEPS = 4
DEFAULT_ETA = 0.0
DEFAULT_TILE = 64          # the training crops' size
DEFAULT_LOW_BAND = 6.0
# the paper: ceil(max tau*) steps (delta = 1), posterior sampling, the sampler's result as it is
PAPER_SETTINGS = {"steps": "paper", "eta": 1.0, "low_band": None}

def noise_model(y: Tensor, noise: NoiseSpec) -> PoissonGaussian:
    """`noise` as a PoissonGaussian: "auto" estimates it per image from y (B, C, H, W)."""
    if isinstance(noise, PoissonGaussian):
        return noise
    if isinstance(noise, str):
        if noise != "auto":
            raise ValueError(f"noise must be 'auto', (sigma_r, sigma_s) or a PoissonGaussian, got {noise!r}")
        return estimate_noise_model(y)
    try:
        sigma_r, sigma_s = noise
    except (TypeError, ValueError):
        raise TypeError(f"noise must be 'auto', (sigma_r, sigma_s) or a PoissonGaussian, got {noise!r}") from None
    return PoissonGaussian(sigma_r, sigma_s)


BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "weights" / "svnr-small.safetensors"


def default_model(device: Union[str, torch.device] = "cpu"):
    """The model bundled with the package (weights/svnr-small.safetensors; its card is beside it)."""
    from .checkpoint import load_model
    if not BUNDLED_MODEL.is_file():
        raise FileNotFoundError(f"the bundled model {BUNDLED_MODEL} is missing from this installation; "
                                "pass model=svnr_fast.app.checkpoint.load_model(PATH) or reinstall svnr_fast")
    # built outside inference mode even when called from denoise(): inference tensors have no version
    # counter, and the model's time-table cache (and SamplerGraphs) read the parameters' versions
    with torch.inference_mode(False):
        return load_model(BUNDLED_MODEL, device)


PLAUSIBLE_MEANS = (-0.5, 1.5)   # of 8 x 8-pixel blocks: noise averages out over them, a wrong scale does not
PLAUSIBILITY_BLOCK = 8


def checked_photos(y) -> Tensor:
    """y as a (B, C, H, W) floating-point batch, refused with a message saying how to fix it when it is not
    photos in the signal domain [0, 1] plus noise (numpy arrays, integer data, 0..255 values, NaN/inf).

    Noisy values leave [0, 1] (at the noise of svnr eval's highest level, 1% of a white photo's values pass
    1.5), but the means of 8 x 8 blocks cut the noise eightfold: one outside [-0.5, 1.5] means a wrong scale.
    """
    if not isinstance(y, Tensor) and hasattr(y, "__array__"):
        raise TypeError(f"y must be a torch.Tensor, got a {type(y).__name__} of shape {getattr(y, 'shape', '?')}; "
                        "convert an (H, W, C) array with torch.from_numpy(array).permute(2, 0, 1)")
    _checks.tensor("y", y, dtypes=None)
    if y.dim() not in (3, 4):
        raise ValueError(f"y must be a photo (C, H, W) or a batch (B, C, H, W), got shape {tuple(y.shape)}")
    if not y.is_floating_point():
        raise TypeError(f"y must be a floating-point tensor in [0, 1], got {str(y.dtype).replace('torch.', '')}; "
                        "convert 8-bit data with y.float() / 255 (16-bit: / 65535)")
    batch = y[None] if y.dim() == 3 else y
    if batch.shape[-1] == 0 or batch.shape[-2] == 0:
        raise ValueError(f"y has no pixels (shape {tuple(y.shape)})")
    _checks.finite("y", batch)
    low, high = PLAUSIBLE_MEANS
    block = min(PLAUSIBILITY_BLOCK, *batch.shape[-2:])
    means = torch.nn.functional.avg_pool2d(batch, block)
    if batch.shape[0] and not bool(((means >= low) & (means <= high)).all()):
        raise ValueError(f"y's means over {block}x{block}-pixel blocks range from {float(means.min()):g} to "
                         f"{float(means.max()):g}, outside [{low}, {high}]; denoise expects the signal domain [0, 1] "
                         "plus noise (which averages out over such blocks): divide 8-bit values by 255 (16-bit by "
                         "65535)")
    return batch


def check_noise_within_schedule(photos: Tensor, noise: PoissonGaussian, table: Tensor) -> None:
    """Refuses noise whose variance passes the end of the model's schedule, gamma(T): tau* would be clamped to
    T and the model, never trained there, returns garbage. Typically sigmas in 0..255 units."""
    largest, end = float(noise.variance(photos.clamp(0, 1)).amax()), float(table[-1])
    if largest > end:
        raise ValueError(f"the noise reaches variance {largest:.3g} (std {largest ** 0.5:.3g}), beyond the end of "
                         f"the model's schedule, gamma(T) = {end:.3g} (std {end ** 0.5:.3g}): no diffusion time "
                         "matches it. sigma_r and sigma_s are standard deviations in units of the pixel values "
                         "0..1 (not 0..255)")


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of full-size tiles covering [0, size) with at least `overlap` pixels shared by neighbours."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def blend_ramp(length: int, start: int, size: int, overlap: int, device) -> Tensor:
    """1-D weights of a tile: raised-cosine ramps over the overlaps with its neighbours, 1 elsewhere."""
    weight = torch.ones(length, dtype=torch.float32, device=device)
    ramp = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(overlap, device=device, dtype=torch.float32) + 0.5) / overlap)
    if start > 0:
        weight[:overlap] = ramp
    if start + length < size:
        weight[-overlap:] = torch.minimum(weight[-overlap:], ramp.flip(0))
    return weight


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Per-channel Gaussian of standard deviation `sigma` px of (B, C, H, W), truncated at 4 sigma, with
    symmetric borders (d c b a | a b c d, whatever the image size), in float32 or wider."""
    radius = max(1, math.ceil(4 * sigma))
    dtype = torch.promote_types(x.dtype, torch.float32)
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=dtype)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    B, C, H, W = x.shape
    planes = x.to(dtype).reshape(B * C, 1, H, W)
    for dim, size in ((2, H), (3, W)):
        period = torch.arange(-radius, size + radius, device=x.device) % (2 * size)
        index = torch.where(period >= size, 2 * size - 1 - period, period)
        planes = planes.index_select(dim, index)
        shape = (1, 1, -1, 1) if dim == 2 else (1, 1, 1, -1)
        planes = torch.nn.functional.conv2d(planes, kernel.view(shape))
    return planes.reshape(B, C, H, W)


def expected_observation(x: Tensor, noise: PoissonGaussian, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
    """E[clip(x + sqrt(V(x)) Z, low, high)], Z ~ N(0, 1): what the observation of a photo x averages to under
    the noise model, where the file clipped it at `low` / `high` ((B,) bounds; +-inf where it did not); and
    P(low < x + sqrt(V(x)) Z < high), its derivative in x (the standard deviation held fixed)."""
    sigma = noise.variance(x.clamp(0, 1)).sqrt().clamp_min(1e-12)
    low, high = low.view(-1, 1, 1, 1).to(x.dtype), high.view(-1, 1, 1, 1).to(x.dtype)
    a, b = (low - x) / sigma, (high - x) / sigma
    below, above = torch.special.ndtr(a), torch.special.ndtr(-b)
    density = (torch.exp(-0.5 * a.square()) - torch.exp(-0.5 * b.square())) / math.sqrt(2 * math.pi)
    clipped = torch.where(below > 0, low * below, 0) + torch.where(above > 0, high * above, 0)
    inside = 1 - below - above
    return clipped + x * inside + sigma * density, inside


LOW_BAND_MIN_SLOPE = 0.5   # where more of the noise is clipped, the observation says less: the step shrinks


def observed_low_band(out: Tensor, y: Tensor, noise: PoissonGaussian, sigma: float) -> Tensor:
    """`out` with its frequencies below ~1/sigma taken from the observation y: out + d, the smooth d with
    G_sigma * E[y | out + d] = G_sigma * y, to first order: d = G_sigma * (y - E[y | out]) / G_sigma * slope.

    The noise is zero-mean and white, so its share of y's low band is tiny (G_8 keeps 3.5% of its standard
    deviation), while the network adds error there that neither the noise nor a pull toward 0.5 explains:
    measured on the held-out photos, the model's error passes the noise's own between the G_4-G_8 band (low
    noise) and the G_8-G_16 band (high noise), and below them it is up to 4x the noise's. With sigma 6 the
    low-pass error drops to the noisy photo's own at every level and PSNR rises 0.3-0.5 dB
    (benchmarks/results/defaults/README.md).
    A photo stored in a file is clipped to [0, 1]: where it is (y never below 0, or never above 1), E[y | out]
    is the mean of the clipped observation and its slope in out is below 1 (`expected_observation`); where
    more than half the noise is clipped, the observation says less, and the step is shrunk
    (LOW_BAND_MIN_SLOPE). Without clipping E[y | out] = out and the slope is 1: out + G_sigma * (y - out).
    """
    low = torch.where(y.amin(dim=(1, 2, 3)) >= 0, 0.0, -math.inf).to(y.device)
    high = torch.where(y.amax(dim=(1, 2, 3)) <= 1, 1.0, math.inf).to(y.device)
    expected, slope = expected_observation(out, noise, low, high)
    step = gaussian_blur(y - expected, sigma) / gaussian_blur(slope, sigma).clamp_min(LOW_BAND_MIN_SLOPE)
    return (out + step).to(out.dtype)


def sample_photos(model: Denoiser, y_prime: Tensor, tau_star: Tensor, table: Tensor, *, steps: int, eta: float,
                  seed: int, tile: Optional[int] = None, overlap: int = 32, tile_batch: int = 4, clamp=(0.0, 1.0),
                  progress: Optional[Callable[[int, int], None]] = None,
                  cuda_graph: Union[bool, SamplerGraphs] = False) -> Tensor:
    """Samples photos from their (y', tau*) (B, C, H, W) / (B, 1, H, W) on checked arguments: the whole batch at
    once, or each photo in overlapping tiles (`tile` pixels, `overlap` shared, `tile_batch` per network call)
    that walk the photo's own per-image steps and are blended with raised-cosine ramps."""
    B, _, H, W = y_prime.shape
    tau_max = tau_star.amax(dim=(1, 2, 3))
    if tile is None or (H <= tile and W <= tile):
        windows = [(0, 0, H, W)]
    else:
        th, tw = min(tile, H), min(tile, W)
        windows = [(r, c, th, tw) for r in tile_starts(H, th, overlap) for c in tile_starts(W, tw, overlap)]
    total = steps if len(windows) == 1 else steps * B * math.ceil(len(windows) / tile_batch)
    done = 0
    graphs = SamplerGraphs() if cuda_graph is True else cuda_graph

    def counted(condition, x, tau):
        nonlocal done
        eps_hat = model(condition, x, tau)
        done += 1
        if progress is not None:
            progress(done, total)
        return eps_hat

    def sampled(y_start: Tensor, tau_start: Tensor, seed: int, tau_max: Tensor) -> Tensor:
        nonlocal done
        if graphs is False:
            return sample(counted, y_start, y_start, tau_start, table, steps=steps, eta=eta, clamp=clamp, seed=seed,
                          tau_max=tau_max)
        # the graph is keyed by the model itself: a wrapper made per call would capture every call anew
        result = sample(model, y_start, y_start, tau_start, table, steps=steps, eta=eta, clamp=clamp, seed=seed,
                        tau_max=tau_max, cuda_graph=graphs)
        done += steps
        if progress is not None:
            progress(done, total)
        return result

    if len(windows) == 1:
        return sampled(y_prime, tau_star, seed, tau_max)
    out = torch.empty_like(y_prime)
    for b in range(B):
        accumulated = torch.zeros(y_prime.shape[1:], dtype=torch.float32, device=y_prime.device)
        weights = torch.zeros((1, H, W), dtype=torch.float32, device=y_prime.device)
        for first in range(0, len(windows), tile_batch):
            group = windows[first:first + tile_batch]
            crops = [(slice(r, r + th), slice(c, c + tw)) for r, c, th, tw in group]
            y_tiles = torch.stack([y_prime[b][:, rows, cols] for rows, cols in crops])
            tau_tiles = torch.stack([tau_star[b][:, rows, cols] for rows, cols in crops])
            tiles = sampled(y_tiles, tau_tiles, seed + 1 + first, tau_max[b].expand(len(group)))
            for tile_out, (r, c, th, tw), (rows, cols) in zip(tiles, group, crops):
                weight = (blend_ramp(th, r, H, overlap, y_prime.device)[:, None]
                          * blend_ramp(tw, c, W, overlap, y_prime.device)[None, :])
                accumulated[:, rows, cols] += tile_out.float() * weight
                weights[:, rows, cols] += weight
        out[b] = (accumulated / weights).to(out.dtype)
    return out


def check_tiling(tile: Optional[int], overlap: Optional[int], tile_batch: int) -> int:
    """The overlap to use (default min(32, tile / 4)) once `tile`, `overlap` and `tile_batch` are checked."""
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 16):
        raise ValueError(f"tile must be None or an int >= 16 (pixels), got {tile!r}")
    if overlap is None:
        overlap = min(32, tile // 4) if tile else 32
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 1 or (tile and overlap >= tile // 2):
        raise ValueError(f"overlap must be an int in [1, tile / 2) (tile={tile!r}), got {overlap!r}; "
                         "pass a smaller overlap or a larger tile")
    if isinstance(tile_batch, bool) or not isinstance(tile_batch, int) or tile_batch < 1:
        raise ValueError(f"tile_batch must be an int >= 1 (tiles per network call), got {tile_batch!r}")
    return overlap


@torch.inference_mode()
def denoise(y: Tensor, noise: NoiseSpec = "auto", model: Optional[Denoiser] = None, steps: StepsSpec = DEFAULT_STEPS,
            eta: float = DEFAULT_ETA, tile: Optional[int] = DEFAULT_TILE, seed: int = 0, overlap: Optional[int] = None,
            tile_batch: int = 4, clamp=(0.0, 1.0), progress: Optional[Callable[[int, int], None]] = None,
            cuda_graph: Union[bool, SamplerGraphs] = False, low_band: Optional[float] = DEFAULT_LOW_BAND) -> Tensor:
    """Denoises y, (C, H, W) or (B, C, H, W) in the signal domain [0, 1] (plus noise), on y's device.

    The defaults were chosen by measurement on held-out photos; `denoise(y, noise, **PAPER_SETTINGS)` runs
    the paper's sampler instead (ceil(max tau*) steps, eta 1, no low-band step).
    noise: "auto" (estimated per image), (sigma_r, sigma_s) (floats or per-image tensors) or a
    PoissonGaussian. model: a denoiser `(y', x, tau) -> eps_hat` with a `variance_table` buffer, such
    as svnr_fast.app.models.SVNRUNet; None loads the bundled model. steps: network evaluations, or "paper"
    (or None) for ceil(max tau*). eta: 0 deterministic, 1 the paper's posterior sampling.
    tile: process photos larger than tile x tile pixels in overlapping tiles (`overlap` pixels shared,
    default min(32, tile / 4); `tile_batch` tiles per network call); None: whole photos at once (memory
    grows with the photo). clamp bounds x0_hat at every step and the result (None: no bound).
    low_band: the result's frequencies below ~1/low_band are taken from the observation
    (`observed_low_band`, a Gaussian of that many pixels); None: the sampler's result as it is.
    progress(done, total) is called after every network evaluation (with cuda_graph: after every tile
    group's or photo's steps, which replay at once).
    cuda_graph (CUDA only): True captures the sampling loop once per kind of tile group and replays it for
    every tile group and photo of that kind; a SamplerGraphs keeps the graphs across calls too. Tile groups
    of one shape share a graph when eta = 0; with eta > 0 each group draws its own noise (its seed is baked
    into its graph), so they share one across the photos of a batch and across calls only. Results are
    those of cuda_graph=False.
    """
    batch = checked_photos(y)
    if isinstance(steps, str) and steps != "paper":
        raise ValueError(f"steps must be an int, 'paper' or None (both: ceil(max tau*)), got {steps!r}")
    _checks.scalar("eta", eta, low=0.0, high=1.0)
    overlap = check_tiling(tile, overlap, tile_batch)
    if low_band is not None:
        _checks.scalar("low_band", low_band, low=0.5)
    if batch.shape[0] == 0:
        return y.clone()
    model = default_model(batch.device) if model is None else model
    table = model.variance_table.to(batch.device)
    # the network runs in its weights' dtype (float64 photos into a float32 model, ...); the result comes
    # back in y's
    weights = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    photos = batch if weights is None else batch.to(weights.dtype)
    noise = noise_model(photos, noise)
    check_noise_within_schedule(photos, noise, table)

    y_prime, tau_star = observe(photos, noise, table, seed=seed)
    steps = default_steps(tau_star) if steps in (None, "paper") else steps
    out = sample_photos(model, y_prime, tau_star, table, steps=steps, eta=eta, seed=seed, tile=tile, overlap=overlap,
                        tile_batch=tile_batch, clamp=clamp, progress=progress, cuda_graph=cuda_graph)
    if low_band is not None:
        out = observed_low_band(out, photos, noise, low_band)
        bounds = _checks.clamp_range(clamp)
        out = out if bounds is None else out.clamp(*bounds)
    out = out.to(y.dtype)
    return out[0] if y.dim() == 3 else out
