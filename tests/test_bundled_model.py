"""The model shipped in the package, and the README's main command."""
import subprocess
import sys

import torch

from svnr_fast import PoissonGaussian
from svnr_fast.app.cli.demo import demo_photo
from svnr_fast.app.denoise import BUNDLED_MODEL, default_model, denoise


def psnr(image: torch.Tensor, clean: torch.Tensor) -> float:
    return float(-10 * torch.log10((image.clamp(0, 1) - clean).square().mean()))


def test_bundled_model_denoises_a_held_out_photo():
    model = default_model()
    assert model.config.channels == 32 and sum(p.numel() for p in model.parameters()) > 3_000_000
    clean = demo_photo(256)[:, 64:160, 64:160]        # astronaut: held out from training
    noisy = PoissonGaussian(0.05, 0.10).sample(clean[None], generator=torch.Generator().manual_seed(0))[0]
    out = denoise(noisy, (0.05, 0.10), model=model, steps=4, eta=0.0)
    assert psnr(out, clean) > psnr(noisy, clean) + 4      # +5.2 dB measured on this detailed crop


def test_svnr_demo_runs(tmp_path):
    assert BUNDLED_MODEL.is_file()
    result = subprocess.run([sys.executable, "-m", "svnr_fast.app.cli", "demo", "--size", "64", "--steps", "2", "--quiet",
                             "-o", str(tmp_path / "demo.png")], capture_output=True, text=True, check=True)
    assert "denoised: PSNR" in result.stdout and (tmp_path / "demo.png").is_file()


def test_denoise_loads_the_bundled_model_when_given_none():
    """svnr_fast.denoise(y, noise) as the README calls it: denoise runs under inference mode, where a model
    built there would have parameters without version counters (its time-table cache reads them)."""
    noisy = PoissonGaussian(0.05, 0.10).sample(demo_photo(64)[None], generator=torch.Generator().manual_seed(0))[0]
    assert denoise(noisy, (0.05, 0.10), steps=1).shape == noisy.shape
