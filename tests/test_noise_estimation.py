"""Accuracy of the (sigma_r, sigma_s) estimate on synthetic Poisson-Gaussian noise over real photos."""
import pytest
import skimage.data
import torch

from svnr_fast import PoissonGaussian
from svnr_fast.app.noise_estimation import estimate_noise


def photo(name: str) -> torch.Tensor:
    image = torch.from_numpy(getattr(skimage.data, name)()).to(torch.float64) / 255
    return image.permute(2, 0, 1) if image.dim() == 3 else image[None]


def std_at(sigma_r: float, sigma_s: float, x: float) -> float:
    return (sigma_r**2 + sigma_s**2 * x) ** 0.5


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "camera"])
@pytest.mark.parametrize("sigma, tolerance", [((0.02, 0.05), 0.15), ((0.05, 0.10), 0.06), ((0.10, 0.20), 0.05)])
def test_estimate_matches_the_true_noise(name, sigma, tolerance):
    """The photos carry some noise of their own (sensor, JPEG): it adds to the synthetic noise."""
    x = photo(name)
    own = estimate_noise(x)
    y = PoissonGaussian(*sigma).sample(x[None], generator=torch.Generator().manual_seed(1))[0]
    estimate = estimate_noise(y)
    for level in (0.1, 0.5, 0.9):
        total = (std_at(*sigma, level) ** 2 + std_at(own.sigma_r, own.sigma_s, level) ** 2) ** 0.5
        ratio = std_at(estimate.sigma_r, estimate.sigma_s, level) / total
        assert abs(ratio - 1) < tolerance, f"noise std at {level}: estimated/true = {ratio:.3f} ({estimate})"


def test_noiseless_smooth_image_has_no_noise():
    ramp = torch.linspace(0.05, 0.95, 256, dtype=torch.float64)
    image = (ramp[None, :, None] * ramp[None, None, :]).expand(3, 256, 256)
    estimate = estimate_noise(image)
    assert estimate.sigma_r < 1e-4 and estimate.sigma_s < 1e-4      # the ramp product has a tiny HH of its own


def test_clipped_photo_is_still_estimated():
    x = photo("astronaut")
    y = PoissonGaussian(0.05, 0.1).sample(x[None], generator=torch.Generator().manual_seed(2))[0].clamp(0, 1)
    estimate = estimate_noise(y)
    assert abs(std_at(estimate.sigma_r, estimate.sigma_s, 0.5) / std_at(0.05, 0.1, 0.5) - 1) < 0.1


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least 8x8"):
        estimate_noise(torch.rand(3, 2, 50))
    with pytest.raises(ValueError, match="takes one image"):
        estimate_noise(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="too small or too clipped"):
        estimate_noise(torch.ones(3, 16, 16))
