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
    ("ok.png", ["--steps", "0"], "--steps must be an int in [1, 10000], got 0"),
    ("ok.png", ["--steps", "100000000000000000000"], "--steps must be an int in [1, 10000]"),
    ("ok.png", ["--steps", "1e20"], "--steps must be an int or 'paper'"),
    ("ok.png", ["--paper", "--eta", "0"], "--paper sets --steps paper --eta 1 --low-band 0; drop --eta"),
    ("ok.png", ["--low-band", "0.1"], "--low-band must be 0 (off) or a Gaussian width >= 0.5"),
    ("ok.png", ["--tile", "8"], "--tile must be >= 16"),
    ("ok.png", ["--sigma-r", "5", "--sigma-s", "0.1"], "beyond the end of the model's schedule"),
    ("ok.png", ["--max-megapixels", "0.0001"], "16x16 = 0.0 megapixels, more than the limit of 0.0001"),
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


@pytest.fixture
def no_denoising(monkeypatch):
    """Fails the test if the denoiser runs: the errors below must come before any work."""
    from svnr_fast.app.cli import denoise as denoise_command

    def refuse(*args, **kwargs):
        raise AssertionError("the denoiser ran before the error was found")

    monkeypatch.setattr(denoise_command, "denoise", refuse)


@pytest.mark.parametrize("output, message", [
    ("{tmp}/missing/out.png", "the folder {tmp}/missing does not exist"),
    ("{tmp}/out.webp", "unknown image type '.webp'"),
    ("{tmp}/in.png", "is the input photo; writing the result there would destroy the original"),
    ("{tmp}/link.png", "is the input photo"),
    ("{tmp}/taken.png", "exists; pass --overwrite to replace it"),
    ("{tmp}", "is a folder"),
    ("/proc/out.png", "cannot write into /proc"),
    ("{tmp}/out.jpg", "has an alpha channel, which JPEG cannot store"),
])
def test_output_problems_are_found_before_denoising(tmp_path, noisy, no_denoising, output, message):
    source = tmp_path / "in.png"
    imageio.write_image(source, noisy[:, :16, :16], alpha=noisy[:1, :16, :16])
    (tmp_path / "link.png").symlink_to(source)
    (tmp_path / "taken.png").write_bytes(b"keep me")
    before = source.read_bytes()
    error = svnr_denoise_error(source, "-o", output.format(tmp=tmp_path), "--sigma-r", 0.05, "--sigma-s", 0.1)
    assert message.format(tmp=tmp_path) in error
    assert source.read_bytes() == before and (tmp_path / "taken.png").read_bytes() == b"keep me"
    # the input is refused as the output even with --overwrite
    if output.endswith("in.png"):
        error = svnr_denoise_error(source, "-o", source, "--overwrite", "--sigma-r", 0.05, "--sigma-s", 0.1)
        assert "is the input photo" in error and source.read_bytes() == before


def test_overwrite_replaces_an_existing_output(tmp_path, noisy):
    source, target = tmp_path / "in.png", tmp_path / "out.png"
    imageio.write_image(source, noisy[:, :16, :16])
    target.write_bytes(b"old")
    svnr_denoise(source, "-o", target, "--overwrite", "--sigma-r", 0.05, "--sigma-s", 0.1, "--steps", 1)
    assert imageio.read_image(target).pixels.shape == (3, 16, 16)


def test_a_model_with_non_finite_weights_is_refused(tmp_path, noisy, no_denoising):
    from svnr_fast.app import checkpoint, models

    model = models.SVNRUNet(models.preset("tiny"))
    with torch.no_grad():
        model.conv_out.bias.fill_(float("nan"))
    checkpoint.save_model(model, tmp_path / "nan.safetensors")
    imageio.write_image(tmp_path / "in.png", noisy[:, :16, :16])
    error = svnr_denoise_error(tmp_path / "in.png", "-o", tmp_path / "out.png", "--model", tmp_path / "nan.safetensors",
                               "--sigma-r", 0.05, "--sigma-s", 0.1)
    assert "--model:" in error and "holds NaN or infinite values in conv_out.bias" in error
    assert not (tmp_path / "out.png").exists()


def test_paper_and_default_settings_reach_denoise(tmp_path, noisy, monkeypatch):
    from svnr_fast.app import denoise as denoise_module
    from svnr_fast.app.cli import denoise as denoise_command
    seen = []

    def recorded(y, noise, **kwargs):
        seen.append({k: kwargs[k] for k in ("steps", "eta", "low_band", "tile")})
        return y

    monkeypatch.setattr(denoise_command, "denoise", recorded)
    imageio.write_image(tmp_path / "in.png", noisy[:, :16, :16])
    for extra in ([], ["--paper"], ["--steps", "paper", "--low-band", "0"]):
        svnr_denoise(tmp_path / "in.png", "-o", tmp_path / "out.png", "--overwrite", "--sigma-r", 0.05, "--sigma-s",
                     0.1, *extra)
    defaults = {"steps": denoise_module.DEFAULT_STEPS, "eta": denoise_module.DEFAULT_ETA,
                "low_band": denoise_module.DEFAULT_LOW_BAND, "tile": denoise_module.DEFAULT_TILE}
    assert seen == [defaults, {**defaults, **denoise_module.PAPER_SETTINGS},
                    {**defaults, "steps": "paper", "low_band": None}]
