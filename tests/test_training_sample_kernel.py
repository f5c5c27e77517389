"""The Triton training_sample kernel (kernels/training_sample.py) against the eager reference, through svnr_fast.ops.

Both phases in one ordered launch, and in two launches per chunk: the whole batch in one chunk, and
chunks of one and two images. Explicit noise: float32 max-norm relative error < 1e-5, float64 < 1e-12, float16/bfloat16 within 2x the
eager error (tests/triton_devices.py). In-kernel noise: statistics of the eps_T and eps' it draws.
"""
import pytest
import torch
from conftest import requires_cuda
from svnr_fast.kernels import training_sample as kernel
from triton_devices import (
    DEVICES,
    LOW_PRECISION,
    as_layout,
    assert_low_precision_ok,
    assert_matches,
    normal_statistics_ok,
    uncorrelated,
)

from svnr_fast import Schedule, ops, reference
from svnr_fast.ops import _checks

TABLE = Schedule().table


def sample_inputs(shape, device, dtype=torch.float32, seed=0, table=TABLE):
    """x0 in [0, 1] with a few negative values, both noises, and per-image sigma_r, sigma_s, u: one image
    without shot noise, u = 0 (no step back) and u = 1 (the noisiest pixel lands at tau = 0)."""
    gen = torch.Generator().manual_seed(seed)
    B = shape[0]
    x0 = torch.rand(shape, generator=gen)
    x0.view(-1)[::17] = -0.05
    eps_T, eps_prime = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    sigma_r = torch.linspace(0.01, 0.3, B)
    sigma_s = torch.linspace(0.2, 0.0, B)
    u = torch.linspace(1.0, 0.0, B) if B > 1 else torch.tensor([0.37])
    data = [t.to(device, dtype) for t in (x0, eps_T, eps_prime)]
    return (*data, sigma_r.to(device), sigma_s.to(device), u.to(device), table.to(device))


@pytest.fixture(params=[None, "whole batch", 1, 2], ids=["ordered", "one_chunk", "chunks_of_1", "chunks_of_2"])
def chunk(request, monkeypatch):
    """How the kernel's launches go: both phases in one ordered launch (None: what small batches get), or
    two launches per chunk of the whole batch, of one or of two images."""
    if request.param is not None:
        images = request.param
        monkeypatch.setattr(kernel, "_launch_limits",
                            lambda shape, dtype, device: (shape[0] if images == "whole batch" else images, 0))
    kernel._plan.cache_clear()
    yield request.param
    kernel._plan.cache_clear()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1, 7, 13), (3, 5, 33, 65)])
@pytest.mark.parametrize("correlated", [True, False])
def test_matches_reference_float32(backend, device, shape, correlated, chunk):
    backend("triton")
    x0, eps_T, eps_prime, sigma_r, sigma_s, u, table = sample_inputs(shape, device)
    kwargs = dict(correlated=correlated, eps_T=eps_T, eps_prime=eps_prime)
    got = ops.training_sample(x0, sigma_r, sigma_s, u, table, **kwargs)
    want = reference.training_sample(x0, sigma_r, sigma_s, u, table, **kwargs)
    assert_matches(got, want)
    assert torch.equal(got[2] == 0, want.tau == 0)                 # the same pixels land at tau = 0 ...
    assert torch.all(got[3][(got[2] == 0).expand_as(x0)] == 0)     # ... and carry a zero target


@pytest.mark.parametrize("device", DEVICES)
def test_float64(backend, device, chunk):
    backend("triton")
    x0, eps_T, eps_prime, sigma_r, sigma_s, u, table = sample_inputs((2, 3, 9, 11), device, torch.float64)
    got = ops.training_sample(x0, sigma_r, sigma_s, u, table, eps_T=eps_T, eps_prime=eps_prime)
    assert [t.dtype for t in got] == [torch.float64] * 4
    want = reference.training_sample(x0, sigma_r, sigma_s, u, table, eps_T=eps_T, eps_prime=eps_prime)
    assert_matches(got, want, bound=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_within_twice_the_eager_error(backend, device, dtype):
    backend("triton")
    x0, eps_T, eps_prime, sigma_r, sigma_s, u, table = sample_inputs((3, 3, 17, 19), device, dtype)
    kwargs = dict(eps_T=eps_T, eps_prime=eps_prime)
    got = ops.training_sample(x0, sigma_r, sigma_s, u, table, **kwargs)
    eager = reference.training_sample(x0, sigma_r, sigma_s, u, table, **kwargs)
    exact = reference.training_sample(x0.double(), sigma_r, sigma_s, u, table, eps_T=eps_T.double(),
                                      eps_prime=eps_prime.double())
    assert got.tau.dtype == torch.float32
    assert_matches([got.tau], [eager.tau])
    assert_low_precision_ok([got.y, got.x_t, got.target], [eager.y, eager.x_t, eager.target],
                            [exact.y, exact.x_t, exact.target])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "strided", "mixed"])
def test_any_memory_layout(backend, device, layout):
    backend("triton")
    x0, eps_T, eps_prime, sigma_r, sigma_s, u, table = sample_inputs((2, 3, 10, 14), device)
    layouts = ("channels_last", "contiguous", "strided") if layout == "mixed" else (layout,) * 3
    args = [as_layout(t, lay) for t, lay in zip((x0, eps_T, eps_prime), layouts)]
    got = ops.training_sample(args[0], sigma_r, sigma_s, u, table, eps_T=args[1], eps_prime=args[2])
    assert_matches(got, reference.training_sample(x0, sigma_r, sigma_s, u, table, eps_T=eps_T, eps_prime=eps_prime))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("table", [torch.tensor([0.5, 1.0]), 0.02 + 3 * torch.linspace(0, 1, 37) ** 2],
                         ids=["T=1,g0=0.5", "T=36,g0=0.02"])
def test_any_table(backend, device, table):
    backend("triton")
    x0, eps_T, eps_prime, sigma_r, sigma_s, u, table = sample_inputs((3, 2, 9, 8), device, table=table)
    sigma_r = sigma_r * 3   # variances that reach past both ends of the table
    got = ops.training_sample(x0, sigma_r, sigma_s, u, table, eps_T=eps_T, eps_prime=eps_prime)
    assert_matches(got, reference.training_sample(x0, sigma_r, sigma_s, u, table, eps_T=eps_T, eps_prime=eps_prime))


@pytest.mark.parametrize("device", DEVICES)
def test_one_noise_given_the_other_drawn(backend, device):
    backend("triton")
    x0, eps_T, eps_prime, sigma_r, sigma_s, u, table = sample_inputs((2, 3, 8, 8), device)
    want = reference.training_sample(x0, sigma_r, sigma_s, u, table, eps_T=eps_T, eps_prime=eps_prime)
    only_eps_T = ops.training_sample(x0, sigma_r, sigma_s, u, table, eps_T=eps_T, seed=4)
    assert_matches([only_eps_T.y, only_eps_T.tau], [want.y, want.tau])
    only_eps_prime = ops.training_sample(x0, sigma_r, sigma_s, u, table, eps_prime=eps_prime, seed=4,
                                         correlated=False)
    uncorrelated_want = reference.training_sample(x0, sigma_r, sigma_s, u, table, eps_T=eps_T, eps_prime=eps_prime,
                                                  correlated=False)
    assert_matches([only_eps_prime.x_t, only_eps_prime.tau, only_eps_prime.target],
                   [uncorrelated_want.x_t, uncorrelated_want.tau, uncorrelated_want.target])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (3, 2, 80, 80)], ids=["whole_tiles", "two_max_programs"])
def test_larger_images_match_reference(backend, device, shape, chunk):
    """Images of whole tiles only (no masks), and images that several max programs reduce together."""
    backend("triton")
    x0, eps_T, eps_prime, sigma_r, sigma_s, u, table = sample_inputs(shape, device)
    kwargs = dict(eps_T=eps_T, eps_prime=eps_prime)
    got = ops.training_sample(x0, sigma_r, sigma_s, u, table, **kwargs)
    want = reference.training_sample(x0, sigma_r, sigma_s, u, table, **kwargs)
    assert_matches(got, want)
    assert torch.equal(got.tau == 0, want.tau == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_ordered_launch_leaves_its_workspace_zero(backend, device):
    """The next ordered launch on the stream reuses the workspace: every slot is back at zero after a launch (a
    slot left set would miscount the next launch's tickets or max programs, or hand it this launch's tau*max),
    with one t0 per image and per batch, and a larger batch next."""
    backend("triton")
    for shape, t0_per in (((3, 2, 40, 40), "image"), ((2, 2, 40, 40), "batch"), ((5, 1, 9, 11), "image")):
        x0, eps_T, eps_prime, sigma_r, sigma_s, u, table = sample_inputs(shape, device)
        u = u[:1] if t0_per == "batch" else u
        kwargs = dict(eps_T=eps_T, eps_prime=eps_prime, t0_per=t0_per)
        want = reference.training_sample(x0, sigma_r, sigma_s, u, table, **kwargs)
        for _ in range(2):
            assert_matches(ops.training_sample(x0, sigma_r, sigma_s, u, table, **kwargs), want)
        workspaces = list(kernel._WORKSPACES.values())
        assert max(w.numel() for w in workspaces) >= 4 + 4 * shape[0]   # the ordered launch ran
        assert not any(w.any() for w in workspaces)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_channel", [False, True], ids=["shared_time_map", "per_channel"])
@pytest.mark.parametrize("t0_per", ["image", "batch"])
@pytest.mark.parametrize("min_std", [0.0, 0.15])
def test_other_codebases_conventions_match_reference(backend, device, per_channel, t0_per, min_std, chunk):
    """Per-channel time maps, one t0 per batch and a floor on the noise std, alone and together."""
    backend("triton")
    x0, eps_T, eps_prime, sigma_r, sigma_s, u, table = sample_inputs((3, 3, 9, 11), device)
    u = u[1:2] if t0_per == "batch" else u
    kwargs = dict(eps_T=eps_T, eps_prime=eps_prime, per_channel=per_channel, t0_per=t0_per, min_std=min_std)
    got = ops.training_sample(x0, sigma_r, sigma_s, u, table, **kwargs)
    want = reference.training_sample(x0, sigma_r, sigma_s, u, table, **kwargs)
    assert got.tau.shape == (3, 3 if per_channel else 1, 9, 11)
    assert_matches(got, want)
    assert torch.equal(got.tau == 0, want.tau == 0)
    assert torch.all(got.target[(got.tau == 0).expand_as(x0)] == 0)


def drawn_noise(device, seed, offset, shape=(2, 4, 40, 48), layout="contiguous", per_channel=False):
    """(eps_T, eps') the kernel draws, recovered in float64 from y' and x_t of a constant image whose
    pixels all sit at tau* > tau > 0."""
    x0 = as_layout(torch.full(shape, 0.5, device=device), layout)
    sigma = torch.full((shape[0],), 0.1, device=device)
    half = torch.full((shape[0],), 0.5, device=device)
    y, x_t, tau, _ = ops.training_sample(x0, sigma, sigma, half, TABLE.to(device), seed=seed, offset=offset,
                                         per_channel=per_channel)
    table = TABLE.to(device).double()
    tau_star = reference._time_from_variance(torch.full_like(tau, 0.01 + 0.01 * 0.5).double(), table)
    g_star, g = reference._gamma(tau_star, table), reference._gamma(tau.double(), table)
    r = g / g_star
    eps_T = (y.double() - 0.5) / g_star.sqrt()
    eps_prime = (x_t.double() - 0.5 - r * (y.double() - 0.5)) / (g * (1 - r)).sqrt()
    return eps_T.cpu(), eps_prime.cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_channel", [False, True], ids=["shared_time_map", "per_channel"])
def test_in_kernel_noise_is_standard_normal_and_streams_are_independent(backend, device, per_channel):
    backend("triton")
    eps_T, eps_prime = drawn_noise(device, seed=99, offset=3, per_channel=per_channel)
    normal_statistics_ok(eps_T)
    normal_statistics_ok(eps_prime)
    assert uncorrelated(eps_T, eps_prime)
    again = drawn_noise(device, seed=99, offset=3, layout="channels_last", per_channel=per_channel)
    assert torch.equal(eps_T, again[0]) and torch.equal(eps_prime, again[1])
    for other in (drawn_noise(device, seed=99, offset=4, per_channel=per_channel),
                  drawn_noise(device, seed=100, offset=3, per_channel=per_channel)):
        assert not torch.equal(eps_T, other[0]) and uncorrelated(eps_T, other[0])
        assert uncorrelated(eps_prime, other[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["triton", "reference"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(backend, device, name, layout):
    backend(name)
    x0, eps_T, eps_prime, sigma_r, sigma_s, u, table = sample_inputs((2, 3, 5, 7), device)
    x0, eps_T, eps_prime = (as_layout(t, layout) for t in (x0, eps_T, eps_prime))
    for noise in ((eps_T, eps_prime), (None, None)):
        for correlated in (True, False):
            torch.library.opcheck(torch.ops.svnr.training_sample,
                                  (x0, sigma_r, sigma_s, u, table, correlated, *noise, 3, 1, False, False, 0.0))


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_batch_on_cuda(backend, dtype, chunk):
    backend("triton")
    x0, eps_T, eps_prime, sigma_r, sigma_s, u, table = sample_inputs((16, 3, 256, 256), "cuda", dtype)
    kwargs = dict(eps_T=eps_T, eps_prime=eps_prime)
    got = ops.training_sample(x0, sigma_r, sigma_s, u, table, **kwargs)
    eager = reference.training_sample(x0, sigma_r, sigma_s, u, table, **kwargs)
    if dtype == torch.float32:
        assert_matches(got, eager)
    else:
        exact = reference.training_sample(x0.double(), sigma_r, sigma_s, u, table, eps_T=eps_T.double(),
                                          eps_prime=eps_prime.double())
        assert_low_precision_ok(got[:2] + got[3:], eager[:2] + eager[3:], exact[:2] + exact[3:])


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("t0_per_batch", [False, True], ids=["t0_per_image", "t0_per_batch"])
def test_cuda_graph_of_the_ordered_launch(backend, t0_per_batch):
    """A captured ordered launch gets a workspace of its own (not the stream's cached one), and its replays,
    between eager calls, give the eager results."""
    backend("triton")
    x0, _, _, sigma_r, sigma_s, u, table = sample_inputs((2, 3, 32, 32), "cuda")
    checked = _checks.training_sample_args(x0, sigma_r, sigma_s, u[:1] if t0_per_batch else u, table, None, None, 5,
                                           2, "batch" if t0_per_batch else "image")
    args = (x0, checked.sigma_r, checked.sigma_s, checked.u, checked.table, True, None, None, 5, 2, False,
            t0_per_batch, 0.0)
    eager = torch.ops.svnr.training_sample(*args)
    cached = dict(kernel._WORKSPACES)
    assert cached                                  # the eager call made an ordered launch
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.svnr.training_sample(*args)
    assert kernel._WORKSPACES.keys() == cached.keys()
    assert all(kernel._WORKSPACES[key] is workspace for key, workspace in cached.items())
    for _ in range(2):
        graph.replay()
        between = torch.ops.svnr.training_sample(*args)
        torch.cuda.synchronize()
        for got, again, want in zip(captured, between, eager):
            assert torch.equal(got, want) and torch.equal(again, want)
