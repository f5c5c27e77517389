"""denoise(): noise handling, the top-up, tiling and blending, the observed low band."""
import math

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


def test_the_paper_s_steps_follow_the_noisiest_pixel():
    from svnr_fast.app.denoise import DEFAULT_STEPS, PAPER_SETTINGS
    y = noisy_photo(shape=(3, 16, 16))
    variance = PoissonGaussian(0.05, 0.1).variance(y[None].clamp(0, 1))
    tau_star = reference.time_map(variance, Schedule().table)
    for settings, calls in (({}, DEFAULT_STEPS), (PAPER_SETTINGS, int(torch.ceil(tau_star.max()))),
                            ({"steps": None}, int(torch.ceil(tau_star.max())))):
        model = PixelwiseDenoiser()
        denoise(y, (0.05, 0.1), model=model, **settings)
        assert model.calls == calls


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
    ({"steps": 0}, ValueError, r"steps must be an int in \[1, 10000\]"),
    ({"steps": "many"}, ValueError, "steps must be an int, 'paper' or None"),
    ({"steps": 10**20}, ValueError, r"steps must be an int in \[1, 10000\]"),
    ({"tile_batch": 0}, ValueError, "tile_batch must be an int >= 1"),
    ({"noise": (5.0, 0.1)}, ValueError, r"noise reaches variance 25.*beyond the end of the model's schedule, "
                                        r"gamma\(T\) = 5 .*not 0..255"),
    ({"noise": (0.05, 10.0)}, ValueError, "beyond the end of the model's schedule"),
])
def test_bad_arguments(kwargs, error, message):
    args = {"noise": (0.05, 0.1), "model": PixelwiseDenoiser()}
    args.update(kwargs)
    model = args["model"]
    with pytest.raises(error, match=message):
        denoise(noisy_photo(shape=(3, 40, 40)), **args)
    assert model.calls == 0     # refused before any network evaluation


@pytest.mark.parametrize("make, error, message", [
    (lambda y: y.permute(1, 2, 0).numpy(), TypeError, r"got a ndarray of shape \(40, 40, 3\); convert"),
    (lambda y: y * 255, ValueError, r"means over 8x8-pixel blocks range from .*, outside \[-0.5, 1.5\].*divide "
                                    "8-bit values by 255"),
    (lambda y: (y.clamp(0, 1) * 255).to(torch.uint8), TypeError, r"floating-point.*got uint8.*y.float\(\) / 255"),
    (lambda y: y[:, :0], ValueError, "y has no pixels"),
    (lambda y: y[None, None], ValueError, r"a photo \(C, H, W\) or a batch \(B, C, H, W\)"),
])
def test_photos_that_are_not_photos_in_0_1_are_refused(make, error, message):
    model = PixelwiseDenoiser()
    with pytest.raises(error, match=message):
        denoise(make(noisy_photo(shape=(3, 40, 40))), (0.05, 0.1), model=model)
    assert model.calls == 0


def test_noisy_values_beyond_0_1_are_accepted():
    # the noisiest training level on a white photo: 8% of its values lie above 1.5, its block means do not
    y = PoissonGaussian(0.2, 0.3).sample(torch.ones(1, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    assert float((y > 1.5).float().mean()) > 0.05
    assert denoise(y, (0.2, 0.3), model=PixelwiseDenoiser(), steps=1).shape == y.shape


def test_float64_photos_and_empty_batches():
    from svnr_fast.app.models import SVNRUNet, preset
    model = SVNRUNet(preset("tiny")).eval()
    y = noisy_photo(shape=(3, 16, 16))
    out = denoise(y.double(), (0.05, 0.1), model=model, steps=1)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, denoise(y, (0.05, 0.1), model=model, steps=1).double())
    empty = torch.zeros(0, 3, 16, 16)
    assert denoise(empty, (0.05, 0.1), model=model).shape == empty.shape


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


def test_gaussian_blur_is_the_metric_s_low_pass():
    from svnr_fast.app import metrics
    from svnr_fast.app.denoise import gaussian_blur
    for shape, sigma in (((2, 3, 40, 52), 8.0), ((1, 1, 9, 12), 8.0), ((1, 3, 30, 20), 1.5)):
        x = torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        expected = torch.stack([torch.from_numpy(metrics.gaussian_blur(image.permute(1, 2, 0).numpy(), sigma))
                                .permute(2, 0, 1) for image in x])
        torch.testing.assert_close(gaussian_blur(x, sigma), expected, rtol=1e-10, atol=1e-10)


def test_expected_observation_is_the_mean_of_the_clipped_noisy_photo():
    from svnr_fast.app.denoise import expected_observation
    x = torch.tensor([0.0, 0.01, 0.1, 0.5, 0.97, 1.0]).view(1, 1, 1, 6)
    noise = PoissonGaussian(0.05, 0.1)
    draws = noise.sample(x.expand(200_000, 1, 1, 6).contiguous(), generator=torch.Generator().manual_seed(0))
    for low, high, clipped in ((0.0, 1.0, draws.clamp(0, 1)), (-math.inf, math.inf, draws),
                               (0.0, math.inf, draws.clamp_min(0))):
        mean, slope = expected_observation(x, noise, torch.tensor([low]), torch.tensor([high]))
        torch.testing.assert_close(mean[0], clipped.mean(0), atol=6e-4, rtol=0)   # ~4 standard errors
        inside = ((draws > low) & (draws < high)).float().mean(0)
        torch.testing.assert_close(slope[0], inside, atol=6e-3, rtol=0)


@pytest.mark.parametrize("clip", [False, True])
def test_observed_low_band_removes_a_coarse_error_and_keeps_the_rest(clip):
    from svnr_fast.app import metrics
    from svnr_fast.app.denoise import gaussian_blur, observed_low_band
    g = torch.Generator().manual_seed(0)
    # a dark photo: 14% of its noisy values are below 0, which a file clips
    clean = gaussian_blur(torch.rand(1, 3, 96, 96, generator=g, dtype=torch.float64), 2.0) * 0.1 + 0.01
    noise = PoissonGaussian(0.05, 0.1)
    observation = noise.sample(clean, generator=g)
    y = observation.clamp(0, 1) if clip else observation
    blotch = 0.06 * gaussian_blur(torch.randn(1, 3, 96, 96, generator=g, dtype=torch.float64), 16.0) * 16
    detail = 0.02 * torch.randn(1, 3, 96, 96, generator=g, dtype=torch.float64)
    out = clean + blotch + detail          # an output with a coarse error and a fine one
    fixed = observed_low_band(out, y, noise, 8.0)

    def low_pass_error(image):
        return metrics.low_pass_error(image[0].permute(1, 2, 0).numpy(), clean[0].permute(1, 2, 0).numpy())

    noise_own = low_pass_error(observation)       # the unclipped noise's, the bar for both
    assert low_pass_error(out) > 4 * noise_own
    assert low_pass_error(fixed) < 1.3 * noise_own
    # a perfect output keeps its coarse picture: clipped shadows pull nothing (the naive G_8 * (y - out) would
    # add the clipping's bias, 1.8x the noise's own low-pass error here)
    assert low_pass_error(observed_low_band(clean, y, noise, 8.0)) < noise_own
    # the fine error is left alone: the correction is smooth
    high = (fixed - out) - gaussian_blur(fixed - out, 1.0)
    assert float(high.abs().max()) < 1e-3
