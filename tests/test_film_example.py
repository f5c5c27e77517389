"""examples/per_pixel_time_unet.py: a diffusers UNet2DModel converted to per-pixel time conditioning with
GroupNormSpatialFiLM computes the original UNet at a uniform knot time, depends on each pixel's own time,
and trains (forward and backward)."""
import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")

from svnr_fast.nn import GroupNormSpatialFiLM  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "per_pixel_time_unet.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("per_pixel_time_unet", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def unets(example):
    torch.manual_seed(0)
    original = example.small_unet().eval()
    with torch.no_grad():   # diffusers zero-initialises nothing here, but make the time path clearly matter
        for name, p in original.named_parameters():
            if "time_emb_proj" in name:
                p.mul_(4)
    return original, example.PerPixelTimeUNet(copy.deepcopy(original)).eval()


def inputs(batch=2, size=32):
    gen = torch.Generator().manual_seed(1)
    return torch.rand(batch, 3, size, size, generator=gen), torch.rand(batch, 3, size, size, generator=gen)


@pytest.mark.parametrize("knot", [0, 40, 256])
def test_a_uniform_knot_time_gives_the_original_unet(unets, knot):
    original, converted = unets
    y_prime, x = inputs()
    t = converted.knot_times[knot].item()
    with torch.no_grad():
        want = original(torch.cat([y_prime, x], dim=1), torch.tensor([t])).sample   # a float tensor: ints truncate
        got = converted(y_prime, x, torch.full((2, 1, 32, 32), t))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_the_output_follows_each_pixels_time(unets):
    _, converted = unets
    y_prime, x = inputs()
    tau = torch.full((2, 1, 32, 32), 30.0)
    changed = tau.clone()
    changed[:, :, :8, :8] = 600.0                      # only the top-left corner is noisier
    with torch.no_grad():
        base, moved = converted(y_prime, x, tau), converted(y_prime, x, changed)
        uniform = converted(y_prime, x, torch.full_like(tau, 600.0))
    change = (moved - base).abs().amax(dim=(0, 1))
    assert change[:8, :8].max() > 10 * change[24:, 24:].max() > 0
    # the corner is conditioned on its own time: closer to the all-600 output there than elsewhere
    near = (moved - uniform).abs()[..., :4, :4].mean()
    far = (moved - uniform).abs()[..., 28:, 28:].mean()
    assert near < far


def test_forward_and_backward_reach_the_time_path(example):
    torch.manual_seed(2)
    model = example.PerPixelTimeUNet(example.small_unet()).train()
    y_prime, x = inputs()
    tau = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(3)) * 1000
    model(y_prime, x, tau).square().mean().backward()
    unet = model.unet
    for parameter in (unet.time_embedding.linear_1.weight, unet.down_blocks[0].resnets[0].block.time_emb_proj.weight,
                      unet.down_blocks[0].resnets[0].block.norm2.weight, unet.conv_in.weight):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    blocks = [m for m in model.modules() if isinstance(m, example.PerPixelResnetBlock)]
    assert len(blocks) == 8 and all(b.film.weight is b.block.norm2.weight for b in blocks)
    assert sum(isinstance(m, GroupNormSpatialFiLM) for m in model.modules()) == 8


def test_from_group_norm_shares_the_parameters_and_refuses_a_non_affine_norm():
    norm = nn.GroupNorm(4, 16, eps=1e-6)
    film = GroupNormSpatialFiLM.from_group_norm(norm)
    assert film.weight is norm.weight and film.bias is norm.bias and film.groups == 4 and film.eps == 1e-6
    with pytest.raises(ValueError, match="affine"):
        GroupNormSpatialFiLM.from_group_norm(nn.GroupNorm(4, 16, affine=False))


def test_a_unet_without_scale_shift_is_refused_with_the_reason(example):
    from diffusers import UNet2DModel
    unet = UNet2DModel(sample_size=8, in_channels=6, out_channels=3, layers_per_block=1, block_out_channels=(8,),
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=4)
    with pytest.raises(ValueError, match="resnet_time_scale_shift='scale_shift'"):
        example.PerPixelTimeUNet(unet)
