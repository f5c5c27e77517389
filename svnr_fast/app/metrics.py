"""Image quality metrics: PSNR, SSIM, the high-frequency energy ratio and the low-pass error (outputs clipped
to [0, 1] first).

PSNR is 10 log10(1 / MSE) for data in [0, 1], in float64; SSIM is scikit-image's over RGB (channel_axis).
"""
from __future__ import annotations

import math

import numpy as np
import torch

HIGH_PASS_SIGMA = 1.0
LOW_PASS_SIGMA = 8.0


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Per-channel Gaussian of standard deviation `sigma` px of x (H, W, C), truncated at 4 sigma, reflected borders."""
    from skimage.filters import gaussian
    return gaussian(x, sigma=sigma, mode="reflect", truncate=4.0, channel_axis=-1, preserve_range=True)


def high_pass_energy(x: np.ndarray) -> float:
    """Sum over pixels and channels of (x - G_1 * x)^2 for x (H, W, C): G_1 a Gaussian of standard deviation
    HIGH_PASS_SIGMA pixels (`gaussian_blur`), so mostly the top octave passes."""
    return float(np.square(x - gaussian_blur(x, HIGH_PASS_SIGMA)).sum())


def high_frequency_ratio(output: np.ndarray, clean: np.ndarray) -> float:
    """High-pass energy of `output` over that of `clean`, both (H, W, C): ~1 keeps texture, < 1 smooths it."""
    reference_energy = high_pass_energy(clean)
    return high_pass_energy(output) / reference_energy if reference_energy > 0 else float("nan")


def low_pass_error(output: np.ndarray, clean: np.ndarray) -> float:
    """RMS over pixels and channels of G_8 * (output - clean), both (H, W, C): the error of the coarse picture.

    White noise of standard deviation s keeps about s / (2 sqrt(pi) 8) = 0.035 s of itself through G_8, so a
    denoiser whose result is worse than the noisy photo here has added blotches or a colour/brightness shift.
    """
    return float(np.sqrt(np.mean(np.square(gaussian_blur(output - clean, LOW_PASS_SIGMA)))))


def image_metrics(output: np.ndarray, clean: np.ndarray) -> dict[str, float]:
    """PSNR, SSIM, HF ratio and low-pass error of `output` (clipped to [0, 1]) against `clean`, both (H, W, C)
    float64."""
    from skimage.metrics import structural_similarity
    output = np.clip(output, 0.0, 1.0)
    return {"psnr": psnr(torch.from_numpy(output), torch.from_numpy(clean)),
            "ssim": float(structural_similarity(clean, output, data_range=1.0, channel_axis=-1)),
            "hf_ratio": high_frequency_ratio(output, clean), "lowpass_error": low_pass_error(output, clean)}


def to_hwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).permute(1, 2, 0).numpy()


def psnr(x: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of x (clamped to [0, 1]) against the reference, in float64."""
    mse = (x.clamp(0, 1).double() - reference.double()).square().mean().item()
    return 10 * math.log10(1 / max(mse, 1e-20))
