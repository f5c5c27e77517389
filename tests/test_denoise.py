"""denoise(): noise handling, the top-up, tiling and blending."""
import pytest
import torch
from conftest import requires_cuda

from svnr_fast import PoissonGaussian, Schedule, reference
from svnr_fast.app.denoise import blend_ramp, denoise, tile_starts
from svnr_fast.sampling import SamplerGraphs


class PixelwiseDenoiser(torch.nn.Module):
    """A stand-in network that looks at one pixel at a time, so tiling cannot change its output."""

    def __init__(self):
        super().__init__()
        self.register_buffer("variance_table", Schedule().table)
        self.calls = 0

    def forward(self, condition, x, tau):
        self.calls += 1
        g = torch.ops.svnr.gamma(tau, self.variance_table)   # the raw op: no value checks, so CUDA graphs can hold it
        return (x - 0.8 * condition - 0.1) / (g + 1e-2).sqrt()


def noisy_photo(shape=(3, 70, 90), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(1, *shape, generator=gen)
    return PoissonGaussian(0.05, 0.1).sample(x, generator=gen)[0]


@pytest.mark.parametrize("tile, overlap", [(32, 8), (48, 16), (64, 20)])
def test_tiles_blend_to_the_untiled_result(tile, overlap):
    y = noisy_photo()
    whole = denoise(y, (0.05, 0.1), model=PixelwiseDenoiser(), steps=4, eta=0.0)
    tiled = denoise(y, (0.05, 0.1), model=PixelwiseDenoiser(), steps=4, eta=0.0, tile=tile, overlap=overlap,
                    tile_batch=3)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)


def test_default_steps_follow_the_noisiest_pixel():
    y = noisy_photo(shape=(3, 16, 16))
    model = PixelwiseDenoiser()
    denoise(y, (0.05, 0.1), model=model)
    variance = PoissonGaussian(0.05, 0.1).variance(y[None].clamp(0, 1))
    tau_star = reference.time_map(variance, Schedule().table)
    assert model.calls == int(torch.ceil(tau_star.max()))


@pytest.mark.parametrize("size, tile, overlap", [(70, 32, 8), (64, 64, 8), (100, 48, 16), (33, 16, 4)])
def test_tiles_cover_the_image_with_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == size
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
    total = sum(torch.nn.functional.pad(blend_ramp(tile, s, size, overlap, "cpu"), (s, size - s - tile))
                for s in starts)
    assert torch.all(total > 0.2)


def test_batch_and_auto_noise():
    y = torch.stack([noisy_photo(seed=1), noisy_photo(seed=2)])
    out = denoise(y, "auto", model=PixelwiseDenoiser(), steps=2)
    assert out.shape == y.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("kwargs, error, message", [
    ({"noise": "loud"}, ValueError, "noise must be 'auto'"),
    ({"noise": 0.1}, TypeError, "noise must be 'auto'"),
    ({"noise": (0.1, -0.1)}, ValueError, "sigma_s must be >= 0"),
    ({"tile": 8}, ValueError, "tile must be None or an int >= 16"),
    ({"tile": 32, "overlap": 16}, ValueError, "overlap must be an int"),
    ({"tile": 64, "overlap": 0}, ValueError, "overlap must be an int"),
    ({"eta": 2.0}, ValueError, "eta must lie in"),
    ({"steps": 0}, ValueError, "steps must be a positive int"),
])
def test_bad_arguments(kwargs, error, message):
    args = {"noise": (0.05, 0.1), "model": PixelwiseDenoiser()}
    args.update(kwargs)
    with pytest.raises(error, match=message):
        denoise(noisy_photo(shape=(3, 40, 40)), **args)


def test_nan_photo_is_refused():
    y = noisy_photo(shape=(3, 16, 16))
    y[0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="y contains NaN"):
        denoise(y, (0.05, 0.1), model=PixelwiseDenoiser())


def test_every_tile_size_has_a_default_overlap():
    y = noisy_photo(shape=(3, 40, 40))
    for tile in (16, 24, 64):
        assert denoise(y, (0.05, 0.1), model=PixelwiseDenoiser(), steps=1, tile=tile).shape == y.shape


@requires_cuda
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_cuda_graph_gives_the_uncaptured_result(eta):
    y = torch.stack([noisy_photo(seed=1), noisy_photo(seed=2)]).cuda()
    model = PixelwiseDenoiser().cuda()
    expected = denoise(y, (0.05, 0.1), model=model, steps=3, eta=eta, tile=32, overlap=8, tile_batch=5)
    graphs = SamplerGraphs()
    seen = []
    got = denoise(y, (0.05, 0.1), model=model, steps=3, eta=eta, tile=32, overlap=8, tile_batch=5, cuda_graph=graphs,
                  progress=lambda done, total: seen.append((done, total)))
    assert torch.equal(got, expected)
    # 3 x 4 tiles of a 70 x 90 photo in groups of 5, 5, 2: two shapes; with eta > 0 each group keeps its own seed
    assert len(graphs) == (2 if eta == 0 else 3)
    assert seen == [(3 * (i + 1), 2 * 3 * 3) for i in range(2 * 3)]   # each photo's 3 groups of 3 steps
