"""`svnr denoise` end to end with the bundled model: bit depths, gray photos, alpha, and the errors a
user can hit. Small photos and one or two steps keep it fast."""
import contextlib
import io

import pytest
import torch

from svnr_fast import PoissonGaussian
from svnr_fast.app import cli, imageio
from svnr_fast.app.cli.demo import demo_photo

pytestmark = pytest.mark.usefixtures("one_thread")


def psnr(image: torch.Tensor, clean: torch.Tensor) -> float:
    return float(-10 * torch.log10((image.clamp(0, 1) - clean).square().mean()))


def svnr_denoise(*argv) -> str:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main(["denoise", *map(str, argv), "--quiet"]) == 0
    return stdout.getvalue()


def svnr_denoise_error(*argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["denoise", *map(str, argv), "--quiet"])
    return str(exit_info.value)


@pytest.fixture(scope="module")
def clean():
    return demo_photo(128)[:, 16:80, 32:96]      # astronaut (held out from the bundled model's training)


@pytest.fixture(scope="module")
def noisy(clean):
    return PoissonGaussian(0.05, 0.1).sample(clean[None], torch.Generator().manual_seed(0))[0].clamp(0, 1)


@pytest.mark.parametrize("bits, suffix", [(8, ".png"), (16, ".png"), (16, ".tif"), (8, ".jpg")])
def test_denoise_keeps_the_bit_depth_and_removes_noise(tmp_path, clean, noisy, bits, suffix):
    source, target = tmp_path / f"noisy{suffix}", tmp_path / f"clean{suffix}"
    imageio.write_image(source, noisy, bits=8 if suffix == ".jpg" else bits, quality=100)
    printed = svnr_denoise(source, "-o", target, "--sigma-r", 0.05, "--sigma-s", 0.1, "--steps", 2)
    assert "noise given sigma_r=0.0500 sigma_s=0.1000" in printed
    result = imageio.read_image(target)
    assert result.bits == (8 if suffix == ".jpg" else bits) and result.pixels.shape == clean.shape
    assert psnr(result.pixels, clean) > psnr(noisy, clean) + 3


def test_gray_photo_with_alpha_and_estimated_noise(tmp_path, clean, noisy):
    gray, alpha = noisy.mean(0, keepdim=True), torch.linspace(0, 1, noisy.shape[2]).expand(1, *noisy.shape[1:])
    imageio.write_image(tmp_path / "gray.png", gray, bits=16, alpha=alpha)
    printed = svnr_denoise(tmp_path / "gray.png", "-o", tmp_path / "out.png", "--steps", 1)
    assert "noise estimated" in printed
    result = imageio.read_image(tmp_path / "out.png")
    assert result.pixels.shape == (1, *clean.shape[1:]) and result.bits == 16
    assert torch.allclose(result.alpha, alpha, atol=1 / 65535)
    assert psnr(result.pixels, clean.mean(0, keepdim=True)) > psnr(gray, clean.mean(0, keepdim=True)) + 3


@pytest.mark.parametrize("make_input, argv, message", [
    (None, [], "no image file at"),
    ("notes.txt", [], "unsupported file type '.txt'"),
    ("broken.png", [], "broken.png"),
    ("ok.png", ["--sigma-r", "0.05"], "give both --sigma-r and --sigma-s"),
    ("ok.png", ["--sigma-r", "-0.1", "--sigma-s", "0.1"], "--sigma-r must be >= 0"),
    ("ok.png", ["--noise", "auto", "--sigma-r", "0.1", "--sigma-s", "0.1"], "exclude each other"),
    ("ok.png", ["--steps", "0"], "steps must be a positive int"),
    ("ok.png", ["--eta", "2"], "eta"),
    ("small.png", [], "too small or too clipped to estimate its noise"),
    ("ok.png", ["--device", "cpu", "--cuda-graph"], "--cuda-graph needs a CUDA device"),
    ("ok.png", ["--model", "{tmp}/missing.safetensors"], "--model: no file at"),
    ("ok.png", ["--model", "{tmp}/ok.png"], "is not a readable safetensors file"),
])
def test_errors_say_what_is_wrong(tmp_path, noisy, make_input, argv, message):
    source = tmp_path / (make_input or "absent.png")
    if make_input in ("ok.png", "small.png"):
        imageio.write_image(source, noisy[:, :16, :16])
        if make_input == "ok.png" and "--sigma-r" not in argv and "--noise" not in argv:
            argv = [*argv, "--sigma-r", "0.05", "--sigma-s", "0.1"]
    elif make_input is not None:
        source.write_bytes(b"not an image")
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "out.png")]
    with contextlib.suppress(FileNotFoundError):
        (tmp_path / "out.png").unlink()
    error = svnr_denoise_error(source, *argv)
    assert message in error
    assert not (tmp_path / "out.png").exists()
