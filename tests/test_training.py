import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from svnr_fast import PoissonGaussian, Schedule, reference
from svnr_fast.app import checkpoint, conditioning, data, imageio, models, training
from svnr_fast.app.checkpoint import CheckpointError
from svnr_fast.app.cli import train
from svnr_fast.app.training import TrainConfig, loop

pytestmark = pytest.mark.usefixtures("one_thread")


def smooth_images(B, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(B, 3, H // 4 + 1, W // 4 + 1, generator=g)
    return F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for split, count, size in (("train", 3, (40, 48)), ("heldout", 2, (24, 32))):
        (root / split).mkdir()
        for i, image in enumerate(smooth_images(count, *size, seed=len(split))):
            imageio.write_image(root / split / f"{i}.png", image)
    return root


def tiny_config(**overrides) -> TrainConfig:
    return TrainConfig(**{"preset": "tiny", "steps": 6, "batch_size": 2, "crop": 16, "log_every": 2,
                          "eval_every": 3, "checkpoint_every": 100, **overrides})


def test_learning_rate_warms_up_then_decays_to_the_final_ratio():
    config = TrainConfig(steps=1000, warmup_steps=100, lr=1e-3, final_lr_ratio=0.01)
    assert training.lr_at(0, config) == pytest.approx(1e-5)
    assert training.lr_at(99, config) == pytest.approx(1e-3)
    assert training.lr_at(550, config) == pytest.approx(0.5 * (1e-3 + 1e-5))
    assert training.lr_at(1000, config) == pytest.approx(1e-5)
    short = TrainConfig(steps=20, warmup_steps=500)       # warm-up never longer than a tenth of the run
    assert training.lr_at(1, short) == pytest.approx(short.lr)


def test_ema_starts_fast_then_uses_the_configured_decay():
    assert training.ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert training.ema_decay_at(100_000, 0.999) == 0.999
    ema, model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    training.update_ema(ema, model, torch.tensor(0.75))
    for e, b, m in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.75 * b + 0.25 * m)


def test_masked_mse_ignores_masked_pixels():
    output, target = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    target[:, :, 0] = 100.0
    mask[:, :, 1:] = True
    assert training.masked_mse(output, target, mask).item() == pytest.approx(1.0)
    assert training.masked_mse(output, target, torch.zeros_like(mask)).item() == 0.0


@pytest.mark.parametrize("scheme", training.SCHEMES)
def test_samples_are_deterministic_per_step_and_rank(scheme):
    config = tiny_config(scheme=scheme)
    model = models.SVNRUNet(config.model_config())
    x0 = smooth_images(3, 16, 16)
    a = training.make_sample(model, x0, config, step=4, rank=0)
    assert all(torch.equal(u, v) for u, v in zip(a, training.make_sample(model, x0, config, step=4, rank=0)))
    assert not torch.equal(a.x_t, training.make_sample(model, x0, config, step=5, rank=0).x_t)
    assert not torch.equal(a.x_t, training.make_sample(model, x0, config, step=4, rank=1).x_t)
    assert a.tau.shape == (3, 1, 16, 16)
    g = model.gamma(a.tau)
    torch.testing.assert_close((a.x_t - x0)[(g > 0).expand_as(x0)], (g.sqrt() * a.eps)[(g > 0).expand_as(x0)],
                               rtol=1e-4, atol=1e-5)
    if scheme == "baseline":
        assert (a.tau == a.tau[:, :, :1, :1]).all()            # one time per image
        noise = a.condition - x0                               # the observed photo: sigma_r^2 <= var <= 0.2^2+0.3^2
        assert 0.005 < noise.std() < 0.4
    else:
        assert (a.tau.amax(dim=(2, 3)) > a.tau.amin(dim=(2, 3))).any()   # per-pixel times


def test_correlation_switch_changes_only_how_x_t_is_drawn():
    x0 = smooth_images(64, 8, 8)
    results = {}
    for scheme in ("svnr", "uncorrelated"):
        config = tiny_config(scheme=scheme)
        model = models.SVNRUNet(config.model_config())
        sample = training.make_sample(model, x0, config, step=0, rank=0)
        # the noise of x_t against the noise of y': covariance gamma(tau) (correlated) or 0
        covariance = ((sample.x_t - x0) * (sample.condition - x0)).mean() / model.gamma(sample.tau).mean()
        results[scheme] = covariance.item()
    assert results["svnr"] == pytest.approx(1.0, abs=0.15)
    assert results["uncorrelated"] == pytest.approx(0.0, abs=0.15)


def test_tiny_model_overfits_one_batch():
    config = tiny_config(lr=3e-3)
    state = training.new_state(config, "cpu")
    x0 = smooth_images(2, 16, 16)
    sample = training.make_sample(state.model, x0, config, step=0, rank=0)
    target, mask = state.model.network_target(x0, sample.x_t, sample.tau, sample.eps)
    losses = []
    for _ in range(60):
        loss = training.masked_mse(state.model.network(sample.condition, sample.x_t, sample.tau), target, mask)
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_compiled_network_trains_like_the_eager_one():
    """`svnr train --compile`: the whole network (with the svnr custom ops, their fake kernels and autograd)
    traces as one graph, and steps give what the eager network gives. aot_eager runs the traced graphs
    without code generation, which keeps the test fast; inductor compiles those same graphs."""
    config = tiny_config()
    eager, compiled = training.new_state(config, "cpu"), training.new_state(config, "cpu")
    network = torch.compile(training.NetworkOutput(compiled.model), backend="aot_eager", fullgraph=True)
    for step in range(2):
        x0 = smooth_images(2, 16, 16, seed=step)
        expected = training.train_step(eager, training.NetworkOutput(eager.model), x0, config)
        loss = training.train_step(compiled, network, x0, config)
        torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    for a, b in zip(eager.model.parameters(), compiled.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_heldout_metric_is_deterministic_and_keeps_the_mode():
    model = models.SVNRUNet(models.preset("tiny")).train()
    crops = list(smooth_images(2, 24, 24))
    first = training.heldout_psnr(model, crops, "svnr")
    assert first == training.heldout_psnr(model, crops, "svnr") and model.training
    noisy, denoised = first
    assert 15 < noisy < 35 and math.isfinite(denoised)
    noisy_baseline, _ = training.heldout_psnr(model, crops, "baseline")
    assert 15 < noisy_baseline < 35


def test_time_limit_stops_before_the_next_check_would_overrun():
    config = tiny_config(log_every=10)
    assert not loop._out_of_time(30.0, 1.0, config, None)
    assert not loop._out_of_time(30.0, 1.0, config, 1.0)     # 30 + 15 + 10 < 60
    assert loop._out_of_time(40.0, 1.0, config, 1.0)         # 40 + 15 + 10 > 60


def _cli(folder, out, *extra):
    return train.main(["--data", str(folder), "--out", str(out), "--preset", "tiny", "--steps", "6",
                       "--batch-size", "2", "--crop", "16", "--log-every", "2", "--eval-every", "3",
                       "--checkpoint-every", "100", "--workers", "0", "--no-progress", "--device", "cpu", *extra])


def _tensors(path):
    return load_file(str(path))


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(photo_folder, tmp_path):
    assert _cli(photo_folder, tmp_path / "whole") == 0
    assert _cli(photo_folder, tmp_path / "parts", "--stop-at", "4") == 0
    with safe_open(str(tmp_path / "parts" / "checkpoint.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "4"
    # resuming needs neither --data (stored) nor the other options
    assert train.main(["--out", str(tmp_path / "parts"), "--resume", "--workers", "0", "--no-progress",
                       "--device", "cpu"]) == 0
    whole, parts = (_tensors(tmp_path / run / "checkpoint.safetensors") for run in ("whole", "parts"))
    assert set(whole) == set(parts)
    assert any(k.startswith("optimizer.") for k in whole) and "rng.0.torch" in whole
    for key in whole:
        assert torch.equal(whole[key], parts[key]), key
    for name in ("best.safetensors", "model.safetensors"):
        a, b = _tensors(tmp_path / "whole" / name), _tensors(tmp_path / "parts" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    log = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "it_per_s"} <= set(log[0]) and any("heldout_psnr" in r for r in log)
    model = checkpoint.load_model(tmp_path / "whole" / "best.safetensors")
    assert model.config == models.preset("tiny")


def test_bad_runs_and_checkpoints_are_refused(photo_folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert _cli(photo_folder, run, "--resume") == 2
    assert "no checkpoint.safetensors" in capsys.readouterr().err
    assert _cli(photo_folder, run, "--stop-at", "2") == 0
    assert _cli(photo_folder, run) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert _cli(photo_folder, run, "--resume", "--lr", "0.1") == 2
    assert "--lr (saved: 0.0003, given: 0.1)" in capsys.readouterr().err
    assert train.main(["--out", str(run), "--resume", "--preset", "small", "--no-progress"]) == 2
    assert "--preset (saved: tiny, given: small)" in capsys.readouterr().err

    checkpoint_path = run / "checkpoint.safetensors"
    good = checkpoint_path.read_bytes()
    config = tiny_config()
    for content, message in ((good[: len(good) // 2], "not a readable safetensors file"),
                             (os.urandom(5000), "not a readable safetensors file"),
                             ((run / "model.safetensors").read_bytes(), "'svnr_fast.model' file, not an "
                                                                       "'svnr_fast.checkpoint'")):
        checkpoint_path.write_bytes(content)
        with pytest.raises(CheckpointError, match=message):
            checkpoint.load_checkpoint(checkpoint_path, config, "cpu")
        assert _cli(photo_folder, run, "--resume") == 2
        assert message.split()[-1].strip("'") in capsys.readouterr().err
    save_file({"x": torch.zeros(2)}, str(checkpoint_path))
    with pytest.raises(CheckpointError, match="without svnr_fast metadata"):
        checkpoint.load_checkpoint(checkpoint_path, config, "cpu")
    checkpoint_path.write_bytes(good)
    with pytest.raises(CheckpointError, match="different model"):
        checkpoint.load_checkpoint(checkpoint_path, dataclasses.replace(config, preset="small"), "cpu")
    state = checkpoint.load_checkpoint(checkpoint_path, config, "cpu")
    assert state.step == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, folder, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    world, device = train.setup_distributed("cpu")
    config = tiny_config(steps=3, eval_every=0)
    state = training.new_state(config, device, world.rank)
    dataset = data.RandomCropBatches(data.find_images(folder / "train"), config.batch_size, config.crop, config.seed,
                                     world.rank)
    training.fit(state, config, dataset, run_dir=out / "run", world=world, progress=False)
    checkpoint.save_model(state.model, out / f"rank{rank}.safetensors")
    torch.distributed.destroy_process_group()


def test_two_process_ddp_keeps_the_replicas_identical(photo_folder, tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), photo_folder, tmp_path), nprocs=2, join=True)
    rank0, rank1 = (_tensors(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    initial = training.new_state(tiny_config(), "cpu").model.state_dict()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert not all(torch.equal(rank0[k], initial[k]) for k in rank0)
    checkpoint = _tensors(tmp_path / "run" / "checkpoint.safetensors")
    assert "rng.0.torch" in checkpoint and "rng.1.torch" in checkpoint
    shutil.rmtree(tmp_path / "run")


def test_observed_input_is_what_inference_builds():
    """The training condition of --time-map observed is denoise()'s top-up of the same noisy photo."""
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand(2, 3, 12, 10, generator=gen)
    sigma_r, sigma_s = torch.tensor([0.02, 0.1]), torch.tensor([0.2, 0.05])
    eps_y, z = torch.randn(2, *x0.shape, generator=gen)
    table = Schedule().table
    y_prime, tau_star = conditioning.observed_input(x0, sigma_r, sigma_s, table, eps_y, z)
    y = x0 + (sigma_r.view(2, 1, 1, 1) ** 2 + sigma_s.view(2, 1, 1, 1) ** 2 * x0).sqrt() * eps_y
    variance = PoissonGaussian(sigma_r, sigma_s).variance(y.clamp(0, 1))
    expected_y, expected_tau = reference.top_up(y, variance, table, z=z)
    torch.testing.assert_close(y_prime, expected_y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tau_star, expected_tau, rtol=1e-6, atol=1e-5)


def test_observed_time_map_sample_is_a_bridge_to_the_observed_condition():
    config = tiny_config(time_map="observed")
    model = models.SVNRUNet(config.model_config())
    x0 = next(iter(smooth_images(4, 16, 16)))[None].expand(4, -1, -1, -1).contiguous()
    sample = training.make_sample(model, x0, config, step=0, rank=0)
    g = model.gamma(sample.tau)
    torch.testing.assert_close(sample.x_t, x0 + g.sqrt() * sample.eps, rtol=1e-5, atol=1e-5)
    # the time map follows the noisy observation, so it is no longer a function of the clean image alone
    again = training.make_sample(model, x0, config, step=1, rank=0)
    assert not torch.equal(sample.condition, again.condition)
    with pytest.raises(ValueError, match="time_map='observed' applies to the svnr schemes"):
        tiny_config(time_map="observed", scheme="baseline")
    with pytest.raises(ValueError, match="time_map must be one of"):
        tiny_config(time_map="clean")


def test_init_starts_from_a_model_file(tmp_path):
    source = models.SVNRUNet(models.preset("tiny"))
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.5)
    checkpoint.save_model(source, tmp_path / "init.safetensors")
    state = training.new_state(tiny_config(init=str(tmp_path / "init.safetensors")), "cpu")
    for a, b in zip(state.model.state_dict().values(), source.state_dict().values()):
        assert torch.equal(a, b)
    checkpoint.save_model(models.SVNRUNet(models.preset("small")), tmp_path / "small.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match="another architecture"):
        training.new_state(tiny_config(init=str(tmp_path / "small.safetensors")), "cpu")


def test_sigterm_to_the_process_group_stops_with_a_checkpoint(photo_folder, tmp_path):
    """A scheduler's SIGTERM reaches the data workers too; the run must still end cleanly."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "svnr_fast.app.cli", "train", "--data", str(photo_folder), "--out", str(out),
               "--preset", "tiny", "--steps", "100000", "--batch-size", "2", "--crop", "16", "--log-every", "2",
               "--eval-every", "0", "--checkpoint-every", "100000", "--workers", "1", "--no-progress",
               "--device", "cpu"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while not (out / "log.jsonl").exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert (out / "log.jsonl").exists(), "training did not start"
        os.killpg(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, stderr.decode()[-2000:]
    assert (out / "checkpoint.safetensors").is_file()
