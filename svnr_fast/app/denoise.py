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


@torch.inference_mode()
def denoise(y: Tensor, noise: NoiseSpec = "auto", model: Optional[Denoiser] = None, steps: Optional[int] = None,
            eta: float = 1.0, tile: Optional[int] = None, seed: int = 0, overlap: Optional[int] = None,
            tile_batch: int = 4, clamp=(0.0, 1.0), progress: Optional[Callable[[int, int], None]] = None,
            cuda_graph: Union[bool, SamplerGraphs] = False) -> Tensor:
    """Denoises y, (C, H, W) or (B, C, H, W) in the signal domain [0, 1] (plus noise), on y's device.

    noise: "auto" (estimated per image), (sigma_r, sigma_s) (floats or per-image tensors) or a
    PoissonGaussian. model: a denoiser `(y', x, tau) -> eps_hat` with a `variance_table` buffer, such
    as svnr_fast.app.models.SVNRUNet; None loads the bundled model. steps: None = ceil(max tau*), the
    paper. tile: process photos larger than tile x tile pixels in overlapping tiles (`overlap` pixels
    shared, default min(32, tile / 4); `tile_batch` tiles per network call). clamp bounds x0_hat at every step (None: no bound).
    progress(done, total) is called after every network evaluation (with cuda_graph: after every tile
    group's or photo's steps, which replay at once).
    cuda_graph (CUDA only): True captures the sampling loop once per kind of tile group and replays it for
    every tile group and photo of that kind; a SamplerGraphs keeps the graphs across calls too. Tile groups
    of one shape share a graph when eta = 0; with eta > 0 each group draws its own noise (its seed is baked
    into its graph), so they share one across the photos of a batch and across calls only. Results are
    those of cuda_graph=False.
    """
    single = y.dim() == 3
    batch = y[None] if single else y
    _checks.tensor("y", batch, ndim=4)
    _checks.finite("y", batch)
    _checks.scalar("eta", eta, low=0.0, high=1.0)
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 16):
        raise ValueError(f"tile must be None or an int >= 16 (pixels), got {tile!r}")
    if overlap is None:
        overlap = min(32, tile // 4) if tile else 32
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 1 or (tile and overlap >= tile // 2):
        raise ValueError(f"overlap must be an int in [1, tile / 2) (tile={tile!r}), got {overlap!r}; "
                         "pass a smaller overlap or a larger tile")
    model = default_model(batch.device) if model is None else model
    table = model.variance_table.to(batch.device)

    y_prime, tau_star = observe(batch, noise_model(batch, noise), table, seed=seed)
    steps = default_steps(tau_star) if steps is None else steps
    tau_max = tau_star.amax(dim=(1, 2, 3))
    H, W = batch.shape[-2:]
    if tile is None or (H <= tile and W <= tile):
        windows = [(0, 0, H, W)]
    else:
        th, tw = min(tile, H), min(tile, W)
        windows = [(r, c, th, tw) for r in tile_starts(H, th, overlap) for c in tile_starts(W, tw, overlap)]
    total = steps * len(batch) * math.ceil(len(windows) / tile_batch)
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

    out = torch.empty_like(batch)
    for b in range(len(batch)):
        if len(windows) == 1:
            out[b:b + 1] = sampled(y_prime[b:b + 1], tau_star[b:b + 1], seed, tau_max[b:b + 1]).to(batch.dtype)
            continue
        accumulated = torch.zeros(batch.shape[1:], dtype=torch.float32, device=batch.device)
        weights = torch.zeros((1, H, W), dtype=torch.float32, device=batch.device)
        for first in range(0, len(windows), tile_batch):
            group = windows[first:first + tile_batch]
            crops = [(slice(r, r + th), slice(c, c + tw)) for r, c, th, tw in group]
            y_tiles = torch.stack([y_prime[b][:, rows, cols] for rows, cols in crops])
            tau_tiles = torch.stack([tau_star[b][:, rows, cols] for rows, cols in crops])
            tiles = sampled(y_tiles, tau_tiles, seed + 1 + first, tau_max[b].expand(len(group)))
            for tile_out, (r, c, th, tw), (rows, cols) in zip(tiles, group, crops):
                weight = (blend_ramp(th, r, H, overlap, batch.device)[:, None]
                          * blend_ramp(tw, c, W, overlap, batch.device)[None, :])
                accumulated[:, rows, cols] += tile_out.float() * weight
                weights[:, rows, cols] += weight
        out[b] = (accumulated / weights).to(batch.dtype)
    return out[0] if single else out
