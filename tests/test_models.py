import dataclasses

import pytest
import torch
import torch.nn.functional as F

import svnr_fast.nn as svnr_nn
from svnr_fast.app import checkpoint, models
from svnr_fast.app.checkpoint import CheckpointError
from svnr_fast.app.models import SVNRUNet, UNetConfig
from svnr_fast.ops import backends

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> SVNRUNet:
    torch.manual_seed(0)
    return SVNRUNet(models.preset("tiny", **overrides))


def randomise_outputs(model: SVNRUNet) -> SVNRUNet:
    """Zero-initialised output convs make a fresh model output 0; give them weights to test the paths."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d) and not module.weight.any():
                module.weight.copy_(0.05 * torch.randn(module.weight.shape, generator=g))
    return model


def inputs(B=2, H=16, W=24, seed=0, tau_max=40.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(B, 3, H, W, generator=g)
    x_t = torch.rand(B, 3, H, W, generator=g)
    tau = torch.rand(B, 1, H, W, generator=g) * tau_max
    tau[:, :, :3] = 0          # finished pixels
    return y, x_t, tau


def test_presets_have_the_advertised_sizes():
    counts = {name: sum(p.numel() for p in SVNRUNet(cfg).parameters()) for name, cfg in models.PRESETS.items()}
    assert counts["tiny"] < 0.5e6
    assert 2e6 <= counts["small"] <= 4e6
    assert counts["base"] > 20e6


def test_config_round_trips_and_rejects_nonsense():
    config = models.preset("small", parametrisation="epsilon")
    assert UNetConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown UNetConfig fields"):
        UNetConfig.from_json('{"channels": 8, "wings": 2}')
    with pytest.raises(ValueError, match="parametrisation"):
        models.preset("tiny", parametrisation="v")
    with pytest.raises(ValueError, match="groups"):
        models.preset("tiny", groups=5)
    with pytest.raises(ValueError, match="attention_levels"):
        models.preset("tiny", attention_levels=(2,))
    with pytest.raises(ValueError, match="unknown preset"):
        models.preset("huge")


def test_knots_are_uniform_in_warped_time():
    T, K = 1000, 257
    times = svnr_nn.knot_times(T, K)
    assert times[0] == 0 and times[-1] == T and times[1] == pytest.approx(T / 256**2)
    torch.testing.assert_close(svnr_nn.warp(times, T, K), torch.arange(K, dtype=torch.float64))


@pytest.mark.parametrize("H,W", [(16, 24), (13, 7), (37, 45)])
def test_any_image_size_and_fresh_model_outputs_zero(H, W):
    model = tiny().eval()
    y, x_t, tau = inputs(H=H, W=W)
    with torch.no_grad():
        out = model.network(y, x_t, tau)
    assert out.shape == (2, 3, H, W) and out.dtype == torch.float32
    assert not out.any()     # zero-initialised output conv


@pytest.mark.parametrize("parametrisation", ["edm", "epsilon"])
def test_prediction_is_consistent(parametrisation):
    model = randomise_outputs(tiny(parametrisation=parametrisation)).eval()
    y, x_t, tau = inputs()
    with torch.no_grad():
        out = model.network(y, x_t, tau)
        prediction = model.predict(y, x_t, tau)
        assert out.abs().max() > 0.01
        torch.testing.assert_close(model(y, x_t, tau), prediction.eps_hat)
    g = model.gamma(tau)
    active = (g > 0).expand_as(x_t)
    # eps_hat = (x_t - x0_hat) / sqrt(gamma); finished pixels: eps_hat = 0 and x0_hat = x_t
    expected = (x_t - prediction.x0_hat) / g.sqrt()
    torch.testing.assert_close(prediction.eps_hat[active], expected[active], rtol=1e-4, atol=1e-4)
    assert not prediction.eps_hat[~active].any()
    torch.testing.assert_close(prediction.x0_hat[~active], x_t[~active])


@pytest.mark.parametrize("parametrisation", ["edm", "epsilon"])
def test_network_target_is_what_recovers_x0(parametrisation):
    model = tiny(parametrisation=parametrisation)
    x0, _, tau = inputs(seed=1)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    x_t = x0 + model.gamma(tau).sqrt() * eps
    target, mask = model.network_target(x0, x_t, tau, torch.where(model.gamma(tau) > 0, eps, 0))
    assert torch.equal(mask, model.gamma(tau) > 0) and torch.isfinite(target).all()
    prediction = model.prediction_from_network(target, x_t, tau)
    torch.testing.assert_close(prediction.x0_hat, x0, rtol=1e-4, atol=1e-4)
    active = mask.expand_as(eps)
    torch.testing.assert_close(prediction.eps_hat[active], eps[active], rtol=1e-3, atol=1e-3)


def test_edm_target_has_unit_scale_at_every_noise_level():
    model = tiny()
    x0 = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for tau_value in (0.5, 20.0, 900.0):
        tau = torch.full((8, 1, 32, 32), tau_value)
        x_t = x0 + model.gamma(tau).sqrt() * torch.randn(x0.shape)
        target, _ = model.network_target(x0, x_t, tau, torch.zeros_like(x0))
        assert 0.4 < target.std() < 1.6, tau_value


def test_time_tables_are_cached_in_eval_and_follow_weight_changes():
    model = randomise_outputs(tiny()).eval()
    y, x_t, tau = inputs()
    with torch.no_grad():
        first = model.time_tables()
        assert model.time_tables() is first                   # cached
        before = model.predict(y, x_t, tau).x0_hat
        for p in model.time_embedding.parameters():            # an in-place update, as optimisers do
            p.mul_(1.5)
        assert model.time_tables() is not first
        after = model.predict(y, x_t, tau).x0_hat
    assert not torch.equal(before, after)
    fresh = tiny()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval().predict(y, x_t, tau).x0_hat, after, rtol=0, atol=0)
        # load_state_dict into a model with a warm cache
        cached = fresh.time_tables()
        fresh.load_state_dict(tiny().state_dict())
        assert fresh.time_tables() is not cached
        torch.testing.assert_close(fresh.predict(y, x_t, tau).x0_hat, tiny().eval().predict(y, x_t, tau).x0_hat,
                                   rtol=0, atol=0)
        # writes through .data bypass the version counters: invalidate_time_tables() is the way to say so
        cached = model.time_tables()
        for p in model.time_embedding.parameters():
            p.data.mul_(0.5)
        model.invalidate_time_tables()
        recomputed = model.time_tables()
        assert recomputed is not cached and not torch.equal(recomputed[0], cached[0])
        model.double()
        assert model.time_tables()[0].dtype == torch.float64   # recomputed after .to()
        assert model.predict(y.double(), x_t.double(), tau.double()).x0_hat.dtype == torch.float64


def test_a_model_made_under_inference_mode_runs_and_caches():
    """Inference tensors have no version counter; the table cache keys them by storage."""
    y, x_t, tau = inputs()
    expected = randomise_outputs(tiny()).eval().predict(y, x_t, tau).x0_hat.detach()
    with torch.inference_mode():
        model = randomise_outputs(tiny()).eval()
        assert next(model.parameters()).is_inference()
        first = model.time_tables()
        assert model.time_tables() is first
        torch.testing.assert_close(model.predict(y, x_t, tau).x0_hat, expected, rtol=0, atol=0)


def test_time_tables_are_differentiable_and_not_cached_in_training():
    model = tiny().train()
    tables = model.time_tables()
    assert tables[0].requires_grad and model.time_tables() is not tables
    model.eval()
    assert model.time_tables()[0].requires_grad                # autograd on: no stale graph is cached
    K = model.config.knots
    assert all(t.shape == (K, 2 * b.norm_film.channels) for t, b in zip(tables, model.res_blocks()))


def test_window_attention_attends_within_windows():
    torch.manual_seed(0)
    attention = models.SelfAttention(32, 16, 8, window=8)
    torch.nn.init.normal_(attention.proj.weight)
    attention.norm = torch.nn.Identity()

    def full(x):
        B, C, H, W = x.shape
        q, k, v = attention.qkv(x).reshape(B, 3, 2, C // 2, H * W).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(B, C, H, W)
        return x + attention.proj(out)

    x = torch.randn(2, 32, 16, 24)
    out = attention(x)
    for i in range(2):
        for j in range(3):
            window = (..., slice(8 * i, 8 * i + 8), slice(8 * j, 8 * j + 8))
            torch.testing.assert_close(out[window], full(x[window]), rtol=1e-5, atol=1e-5)
    assert attention(torch.randn(1, 32, 13, 5)).shape == (1, 32, 13, 5)


@pytest.mark.skipif(backends.choose("groupnorm_film", "cpu").backend == "reference",
                    reason="no fused groupnorm_film for CPU tensors here (svnr_fast._C not built)")
def test_fused_and_reference_film_give_the_same_model(backend):
    model = randomise_outputs(tiny()).train()
    y, x_t, tau = inputs(B=2, H=32, W=32)

    def run():
        model.zero_grad()
        out = model.network(y, x_t, tau)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    fused_out, fused_grads = run()
    backend("reference")
    reference_out, reference_grads = run()
    torch.testing.assert_close(fused_out, reference_out, rtol=1e-4, atol=1e-5)
    for fused, reference in zip(fused_grads, reference_grads):
        torch.testing.assert_close(fused, reference, rtol=1e-3, atol=1e-5)


def test_save_and_load_round_trip(tmp_path):
    model = randomise_outputs(tiny(parametrisation="epsilon"))
    checkpoint.save_model(model, tmp_path / "m.safetensors", {"note": "hello"})
    loaded = checkpoint.load_model(tmp_path / "m.safetensors")
    assert loaded.config == model.config and not loaded.training
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_foreign_and_broken_model_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    checkpoint.save_model(tiny(), good)
    data = good.read_bytes()
    cases = {
        "random.safetensors": (torch.randint(0, 256, (4000,), dtype=torch.uint8).numpy().tobytes(),
                               "not a readable safetensors file"),
        "truncated.safetensors": (data[: len(data) // 2], "not a readable safetensors file"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=message):
            checkpoint.load_model(tmp_path / name)
    save_file({"w": torch.zeros(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="without svnr_fast metadata"):
        checkpoint.load_model(tmp_path / "plain.safetensors")
    save_file({"w": torch.zeros(3)}, str(tmp_path / "ckpt.safetensors"), metadata={"format": "svnr_fast.checkpoint"})
    with pytest.raises(CheckpointError, match="'svnr_fast.checkpoint' file, not an 'svnr_fast.model'"):
        checkpoint.load_model(tmp_path / "ckpt.safetensors")
    # small weights under a tiny config: the weights do not fit
    small = SVNRUNet(models.preset("small"))
    checkpoint.atomic_save(small.state_dict(), {"format": checkpoint.MODEL_FORMAT, "model_config": tiny().config.to_json()},
                       tmp_path / "mixed.safetensors")
    with pytest.raises(CheckpointError, match="weights do not fit"):
        checkpoint.load_model(tmp_path / "mixed.safetensors")
    config = dataclasses.asdict(tiny().config) | {"channels": "many"}
    checkpoint.atomic_save({}, {"format": checkpoint.MODEL_FORMAT, "model_config": str(config)}, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="model config"):
        checkpoint.load_model(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError):
        checkpoint.load_model(tmp_path / "missing.safetensors")
