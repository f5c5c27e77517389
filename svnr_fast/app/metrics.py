"""Image quality metrics: PSNR, SSIM, the high-frequency energy ratio (outputs clipped to [0, 1] first).

PSNR is 10 log10(1 / MSE) for data in [0, 1], in float64; SSIM is scikit-image's over RGB (channel_axis).
"""
from __future__ import annotations

import math

import numpy as np
import torch

HIGH_PASS_SIGMA = 1.0


def high_pass_energy(x: np.ndarray) -> float:
    """Sum over pixels and channels of (x - G_1 * x)^2 for x (H, W, C): G_1 a Gaussian of standard deviation
    HIGH_PASS_SIGMA pixels (truncated at 4 sigma, reflected borders), so mostly the top octave passes."""
    from skimage.filters import gaussian
    smooth = gaussian(x, sigma=HIGH_PASS_SIGMA, mode="reflect", truncate=4.0, channel_axis=-1, preserve_range=True)
    return float(np.square(x - smooth).sum())


def high_frequency_ratio(output: np.ndarray, clean: np.ndarray) -> float:
    """High-pass energy of `output` over that of `clean`, both (H, W, C): ~1 keeps texture, < 1 smooths it."""
    reference_energy = high_pass_energy(clean)
    return high_pass_energy(output) / reference_energy if reference_energy > 0 else float("nan")


def image_metrics(output: np.ndarray, clean: np.ndarray) -> dict[str, float]:
    """PSNR, SSIM and HF ratio of `output` (clipped to [0, 1]) against `clean`, both (H, W, C) float64."""
    from skimage.metrics import structural_similarity
    output = np.clip(output, 0.0, 1.0)
    return {"psnr": psnr(torch.from_numpy(output), torch.from_numpy(clean)),
            "ssim": float(structural_similarity(clean, output, data_range=1.0, channel_axis=-1)),
            "hf_ratio": high_frequency_ratio(output, clean)}


def to_hwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).permute(1, 2, 0).numpy()


def psnr(x: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of x (clamped to [0, 1]) against the reference, in float64."""
    mse = (x.clamp(0, 1).double() - reference.double()).square().mean().item()
    return 10 * math.log10(1 / max(mse, 1e-20))
