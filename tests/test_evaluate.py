"""`svnr eval`: the whole run on two tiny photos with untrained tiny models, the metrics, the variance
stabilisation, skipped methods and bad arguments."""
import contextlib
import csv
import io
import json
import sys
import types
import xml.dom.minidom

import numpy as np
import pytest
import torch
from PIL import Image

from svnr_fast import PoissonGaussian
from svnr_fast.app import cli, metrics
from svnr_fast.app.checkpoint import save_model
from svnr_fast.app.cli import eval as eval_command
from svnr_fast.app.evaluation import methods, report, runner
from svnr_fast.app.models import SVNRUNet, preset

CROP = 32
LEVELS = ["0.02,0.05", "0.05,0.1"]
METHODS = ["noisy", "svnr", "svnr-1", "svnr-2", "x0hat", "baseline-3", "ablation", "bm3d", "nlm", "wavelet"]


pytestmark = pytest.mark.usefixtures("one_thread")


def photo(name: str) -> np.ndarray:
    import skimage.data
    return getattr(skimage.data, name)()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two clean 48x40 photos, so that the 32x32 centre crop is a real crop."""
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(photo("astronaut")[90:138, 180:220]).save(folder / "astronaut.png")
    Image.fromarray(photo("coffee")[100:148, 200:240]).save(folder / "coffee.png")
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Untrained tiny models; the baseline and the ablation carry the training record `svnr train` writes."""
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for seed, (role, scheme) in enumerate([("svnr", None), ("baseline", "baseline"), ("ablation", "uncorrelated")]):
        torch.manual_seed(seed)
        paths[role] = folder / f"{role}.safetensors"
        record = {"train_config": json.dumps({"scheme": scheme}), "step": "0"} if scheme else None
        save_model(SVNRUNet(preset("tiny")), paths[role], record)
    return paths


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(["eval", *argv])
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def run(photos, models, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    code, stdout, stderr = run_cli(["--data", str(photos), "--crop", str(CROP), "--levels", *LEVELS,
                                    "--methods", *METHODS, "--svnr", str(models["svnr"]),
                                    "--baseline", str(models["baseline"]), "--ablation", str(models["ablation"]),
                                    "--out", str(out), "--quiet"])
    assert code == 0
    return out, stdout, stderr


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def ran_methods():
    return [m for m in METHODS if methods.classical_unavailable(m) is None]


def test_end_to_end_writes_every_table_and_figure(run):
    out, stdout, stderr = run
    summary = read_csv(out / "results.csv")
    assert tuple(summary[0]) == report.SUMMARY_COLUMNS
    assert [(r["level"], r["method"]) for r in summary] == [(level, m) for level in LEVELS for m in ran_methods()]
    assert all(r["images"] == "2" for r in summary)
    per_image = read_csv(out / "per_image.csv")
    assert tuple(per_image[0]) == report.PER_IMAGE_COLUMNS
    assert len(per_image) == 2 * len(LEVELS) * len(ran_methods())
    markdown = (out / "results.md").read_text()
    assert "| method | level | PSNR | SSIM | HF ratio | NFE | seconds |" in markdown
    assert "| method | level | PSNR | SSIM | HF ratio | NFE | seconds |" in stdout    # the table is printed
    for name in set(METHODS) - set(ran_methods()):
        assert f"skipping {name}:" in stderr and f"`{name}`:" in markdown
    svg = xml.dom.minidom.parse(str(out / "quality_vs_steps.svg"))
    titles = [t.firstChild.data for t in svg.getElementsByTagName("text") if t.getAttribute("font-weight") == "bold"]
    assert titles == ["sigma_r=0.02, sigma_s=0.05", "sigma_r=0.05, sigma_s=0.1"]
    network_rows = [r for r in summary if float(r["nfe"]) > 0]
    assert len(svg.getElementsByTagName("circle")) == len(network_rows)
    for level in LEVELS:
        grid = Image.open(out / f"grid-{level.replace(',', '-')}.png")
        # noisy | svnr | baseline-3 | ablation | best classical | clean, each enlarged to 96 px
        assert grid.size == (6 * 96 + 5 * 4, 96 + 28)


def test_step_counts_and_single_step_agreement(run):
    out, _, _ = run
    rows = {(r["level"], r["method"], r["image"]): r for r in read_csv(out / "per_image.csv")}
    for (level, method, image), row in rows.items():
        expected = {"noisy": 0, "svnr-1": 1, "svnr-2": 2, "x0hat": 1, "baseline-3": 3, "nlm": 0}.get(method)
        if expected is not None:
            assert int(row["nfe"]) == expected
        if method == "svnr":
            # ceil(max tau*): the same y' (and so the same steps) for the ablation
            assert int(row["nfe"]) >= 1 and row["nfe"] == rows[(level, "ablation", image)]["nfe"]
        if method == "x0hat":
            # one reverse step to time 0 returns x0_hat: svnr-1 and x0hat are the same picture
            assert float(row["psnr"]) == pytest.approx(float(rows[(level, "svnr-1", image)]["psnr"]), abs=1e-3)


def test_noisy_row_is_the_psnr_of_the_clipped_noisy_photo(run, photos):
    out, _, _ = run
    rows = read_csv(out / "per_image.csv")
    for name in ("astronaut", "coffee"):
        clean = np.asarray(Image.open(photos / f"{name}.png"), dtype=np.float64) / 255
        top, left = (clean.shape[0] - CROP) // 2, (clean.shape[1] - CROP) // 2
        clean = clean[top:top + CROP, left:left + CROP]
        for level in LEVELS:
            sigmas = methods.parse_level(level)
            generator = torch.Generator().manual_seed(runner.noise_seed(0, name, sigmas))
            x = torch.from_numpy(clean).permute(2, 0, 1).float()[None]
            noisy = PoissonGaussian(*sigmas).sample(x, generator=generator)[0].permute(1, 2, 0).double().numpy()
            psnr = 10 * np.log10(1 / np.mean((np.clip(noisy, 0, 1) - clean) ** 2))
            row = next(r for r in rows if r["image"] == name and r["level"] == level and r["method"] == "noisy")
            assert float(row["psnr"]) == pytest.approx(psnr, abs=1e-4)
            assert float(row["hf_ratio"]) > 1


def test_high_frequency_ratio_sees_noise_and_blur():
    from skimage.filters import gaussian
    clean = photo("astronaut")[100:164, 180:244].astype(np.float64) / 255
    noisy = clean + 0.05 * np.random.default_rng(0).standard_normal(clean.shape)
    blurred = gaussian(clean, sigma=2, channel_axis=-1)
    assert metrics.high_frequency_ratio(clean, clean) == pytest.approx(1.0)
    assert metrics.high_frequency_ratio(noisy, clean) > 1.5
    assert metrics.high_frequency_ratio(blurred, clean) < 0.3


@pytest.mark.parametrize("sigma_r, sigma_s", [(0.02, 0.05), (0.1, 0.2), (0.05, 0.0), (0.0, 0.1)])
def test_anscombe_round_trip_on_noise_free_values(sigma_r, sigma_s):
    x = np.linspace(0, 1, 101)
    back = methods.inverse_anscombe(methods.anscombe(x, sigma_r, sigma_s), sigma_r, sigma_s, unbiased=False)
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sigma_r, sigma_s", [(0.02, 0.05), (0.05, 0.1), (0.1, 0.2)])
def test_anscombe_stabilises_and_the_unbiased_inverse_undoes_the_mean(sigma_r, sigma_s):
    rng = np.random.default_rng(1)
    for x in (0.05, 0.3, 0.9):
        y = x + np.sqrt(sigma_r**2 + sigma_s**2 * x) * rng.standard_normal(200_000)
        f = methods.anscombe(y, sigma_r, sigma_s)
        assert f.var() == pytest.approx(1.0, abs=0.15)
        # an ideal denoiser returns E[f(y)]; the unbiased inverse maps that back to x, the algebraic one does not
        mean = np.array([f.mean()])
        assert methods.inverse_anscombe(mean, sigma_r, sigma_s)[0] == pytest.approx(x, abs=2e-3)
        assert abs(methods.inverse_anscombe(mean, sigma_r, sigma_s, unbiased=False)[0] - x) > 5e-4


@pytest.mark.parametrize("name", ["nlm", "wavelet"])
def test_classical_denoisers_remove_most_of_the_noise(name):
    if methods.classical_unavailable(name):
        pytest.skip(methods.classical_unavailable(name))
    clean = photo("astronaut")[100:196, 150:246].astype(np.float64) / 255
    noisy = PoissonGaussian(0.05, 0.1).sample(torch.from_numpy(clean).permute(2, 0, 1)[None],
                                               torch.Generator().manual_seed(0))[0].permute(1, 2, 0).numpy()
    denoised = methods.classical_denoise(name, noisy, 0.05, 0.1)
    gain = metrics.image_metrics(denoised, clean)["psnr"] - metrics.image_metrics(noisy, clean)["psnr"]
    assert gain > 5.0


def test_bm3d_runs_on_the_stabilised_photo_when_the_package_imports(monkeypatch):
    calls = []

    def bm3d_rgb(z, sigma_psd):
        calls.append(sigma_psd)
        return z

    monkeypatch.setitem(sys.modules, "bm3d", types.SimpleNamespace(bm3d_rgb=bm3d_rgb))
    assert methods.classical_unavailable("bm3d") is None
    y = np.random.default_rng(2).uniform(0.1, 0.9, (16, 16, 3))
    out = methods.classical_denoise("bm3d", y, 0.05, 0.1)
    assert calls == [1.0]
    np.testing.assert_allclose(out, methods.inverse_anscombe(methods.anscombe(y, 0.05, 0.1), 0.05, 0.1))


def test_missing_models_and_packages_are_skipped_with_a_reason(photos, tmp_path, monkeypatch):
    monkeypatch.setattr(eval_command, "BUNDLED_MODEL", tmp_path / "not-installed.safetensors")
    monkeypatch.setitem(sys.modules, "bm3d", None)       # import bm3d fails
    code, stdout, stderr = run_cli(["--data", str(photos), "--crop", "32", "--limit", "1", "--levels", "0.05,0.1",
                                    "--methods", "noisy,svnr", "x0hat", "baseline", "ablation-4", "bm3d", "nlm",
                                    "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0
    assert "skipping svnr: no SVNR model: pass --svnr MODEL" in stderr
    assert "skipping x0hat: no SVNR model" in stderr
    assert "skipping baseline: no baseline model: pass --baseline MODEL" in stderr
    assert "skipping ablation-4: no ablation model: pass --ablation MODEL" in stderr
    assert "skipping bm3d: the optional `bm3d` package is not installed" in stderr
    assert [r["method"] for r in read_csv(tmp_path / "out" / "results.csv")] == ["noisy", "nlm"]


@pytest.mark.parametrize("argv, message", [
    (["--levels", "0.05"], "a noise level is SIGMA_R,SIGMA_S"),
    (["--levels", "0.05;0.1"], "a noise level is SIGMA_R,SIGMA_S"),
    (["--levels", "0.1,-0.1"], "must be finite and >= 0"),
    (["--levels", "0,0"], "adds no noise"),
    (["--methods", "svnr-0"], "unknown method 'svnr-0'"),
    (["--methods", "dncnn"], "unknown method 'dncnn'"),
])
def test_bad_arguments_are_named(photos, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--data", str(photos), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_data_and_models_give_clear_errors(photos, models, tmp_path, monkeypatch):
    monkeypatch.setattr(eval_command, "BUNDLED_MODEL", tmp_path / "not-installed.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no photos here")
    wrong_scheme = ["--methods", "svnr", "--svnr", str(models["baseline"])]
    cases = [(["--data", str(tmp_path / "missing")], "no folder or image at"),
             (["--data", str(empty)], "no images"),
             (["--data", str(photos), "--methods", "nlm", "--crop", "-1"], "--crop must be >= 0"),
             (["--data", str(photos), "--methods", "svnr"], "none of the methods asked for can run here"),
             (["--data", str(photos), "--svnr", str(tmp_path / "nope.safetensors")], "--svnr: no file at"),
             (["--data", str(photos), *wrong_scheme], "trained with scheme 'baseline', but --svnr needs"),
             (["--data", str(photos), "--methods", "baseline-2000", "--baseline", str(models["baseline"])],
              "ask for at most baseline-1000")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_cli([*argv, "--out", str(tmp_path / "out"), "--quiet"])
        assert str(exit_info.value).startswith("svnr eval: ") and message in str(exit_info.value), argv


def test_dataset_root_uses_its_heldout_split(tmp_path):
    for split, name in (("train", "a"), ("heldout", "b"), ("heldout", "c")):
        (tmp_path / split).mkdir(exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / split / f"{name}.png")
    files, folder = runner.image_files(tmp_path)
    assert folder == tmp_path / "heldout" and [f.name for f in files] == ["b.png", "c.png"]


def test_centre_crop_keeps_small_sides():
    image = torch.arange(3 * 10 * 40, dtype=torch.float32).reshape(3, 10, 40)
    crop = runner.centre_crop(image, 16)
    assert crop.shape == (3, 10, 16) and torch.equal(crop, image[:, :, 12:28])
    assert runner.centre_crop(image, 0) is image


def test_method_names():
    assert methods.parse_method("SVNR-08") == methods.Method("svnr-8", "svnr", 8)
    assert methods.parse_method("baseline") == methods.Method("baseline", "baseline", None)
    assert methods.parse_method("x0hat").model == "svnr"
    assert methods.parse_method("ablation-3").model == "ablation"
    with pytest.raises(ValueError, match="unknown method"):
        methods.parse_method("baseline-")


def test_true_noise_is_given_to_the_methods_when_asked(photos):
    files, folder = runner.image_files(photos)
    images = runner.load_images(files, folder, CROP, limit=1)
    wanted = [methods.parse_method(m) for m in ("noisy", "nlm")]
    result = runner.evaluate(images, [(0.05, 0.1)], wanted, {}, noise="true", progress=False)
    assert [(r["method"], r["sigma_r_used"], r["sigma_s_used"]) for r in result.rows] == [
        ("noisy", 0.05, 0.1), ("nlm", 0.05, 0.1)]
    with pytest.raises(ValueError, match="noise must be 'estimated' or 'true'"):
        runner.evaluate(images, [(0.05, 0.1)], wanted, {}, noise="given", progress=False)


def test_svnr_and_ablation_see_the_same_inputs_and_draws(photos):
    """Two copies of one model as SVNR and ablation give the same pictures: y' and the sampler noise are shared."""
    files, folder = runner.image_files(photos)
    images = runner.load_images(files, folder, CROP, limit=1)
    torch.manual_seed(0)
    model = SVNRUNet(preset("tiny")).eval()
    wanted = [methods.parse_method(m) for m in ("svnr", "ablation")]
    result = runner.evaluate(images, [(0.02, 0.05)], wanted, {"svnr": model, "ablation": model}, progress=False)
    svnr, ablation = result.rows
    assert svnr["nfe"] == ablation["nfe"] and svnr["psnr"] == ablation["psnr"]
    with pytest.raises(ValueError, match="method ablation needs the ablation model"):
        runner.evaluate(images, [(0.02, 0.05)], wanted, {"svnr": model}, progress=False)
