"""The CUDA groupnorm_film kernels (csrc/groupnorm_film_cuda.cu) run on the CPU emulation of csrc/emulation/.

Without a GPU this is the only check of the CUDA kernels' logic: the real kernels run thread by thread, with
__syncthreads and warp shuffles, deadlocks and writes past dynamic shared memory detected (csrc/emulation/
README.md says what it cannot see). The emulated module replaces svnr_fast._C in the op's Python glue
(svnr_fast.ops.groupnorm_film), whose CUDA entry points then run on CPU memory. Criteria as in
test_groupnorm_film.py: float32 < 1e-5, float64 < 1e-12 relative to the float64 reference, bfloat16 and
float16 results at most 2x the eager reference's error. EMU_SMS is the multiprocessor count the emulated device reports: 1
makes every eligible NCHW shape take the one-block-per-group kernels (the one-launch forward, the knot-sorted
backward), 132 (an H100) the chunked ones. groupnorm_silu runs the same kernels without FiLM (K = 0: their
WithFilm = false instantiations).
"""
import ctypes
import importlib
import importlib.machinery
import importlib.util
from pathlib import Path

import pytest
import torch
from test_groupnorm_film import (
    NAMES,
    SILU_NAMES,
    film_inputs,
    float64_reference,
    relative_error,
    run,
    run_silu,
    silu_inputs,
)

from svnr_fast import reference
from svnr_fast.ops import _native

glue = importlib.import_module("svnr_fast.ops.groupnorm_film")   # the module (the package attribute is the op)


def _load_builder():
    path = Path(__file__).resolve().parents[1] / "csrc" / "emulation" / "build.py"
    spec = importlib.util.spec_from_file_location("svnr_cuda_emulation_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


emulation = _load_builder()


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """(the emulated extension module, a function giving the number of kernels it has launched)."""
    if emulation.compiler() is None:
        pytest.skip("no C++ compiler (g++ or $CXX) to build the CUDA emulation")
    path = emulation.build(tmp_path_factory.mktemp("cuda_emulation"))
    loader = importlib.machinery.ExtensionFileLoader("_C", str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("_C", loader))
    loader.exec_module(module)
    launches = ctypes.CDLL(str(path)).svnr_emu_launches
    launches.restype = ctypes.c_longlong
    return module, launches


@pytest.fixture
def cuda_glue(emulated, monkeypatch):
    """Route the op's glue to the emulated CUDA entry points for CPU tensors."""
    module, launches = emulated

    def run_cuda(ext, backward, shape, addresses, eps, silu, h):
        workspace = torch.empty(ext.groupnorm_film_cuda_workspace_bytes(shape), dtype=torch.uint8)
        ext.groupnorm_film_cuda(backward, shape, addresses, eps, silu, workspace.data_ptr(), 0, 0)

    monkeypatch.setattr(_native, "extension", lambda: module)
    monkeypatch.setattr(glue, "_run", run_cuda)
    return launches


# (shape (B, C, H, W, groups), dtype, layout, knots, u misaligned, EMU_SMS, forward launches: 1 for the one-launch
# path, 3 for the three-launch path, 4 when it is NCHW and transposes the table first)
CASES = [
    # one-launch forward: one block per (image, group), its FiLM segments in shared memory
    ((2, 16, 8, 8, 4), torch.float32, "nchw", 9, False, 1, 1),
    ((2, 16, 8, 8, 4), torch.bfloat16, "nchw", 9, False, 1, 1),
    ((3, 16, 8, 8, 4), torch.float16, "nchw", 9, False, 1, 1),
    ((4, 8, 2, 2, 8), torch.float32, "nchw", 9, False, 1, 1),           # one channel per group
    ((2, 4, 64, 128, 2), torch.bfloat16, "nchw", 9, False, 1, 1),       # 16384 elements per group
    ((8, 64, 32, 32, 32), torch.bfloat16, "nchw", 257, False, 1, 1),   # a UNet level: grad_h rounded once
    ((2, 16, 4, 4, 8), torch.float32, "nchw", 1279, False, 1, 1),       # FiLM segments fill the 40 KB
    ((2, 16, 4, 4, 8), torch.float32, "nchw", 1280, False, 1, 4),       # they do not fit
    ((2, 32, 8, 8, 4), torch.float32, "nchw", 9, True, 1, 4),           # u misaligned: scalar loads
    ((2, 10, 6, 4, 5), torch.float64, "nchw", 9, False, 1, 4),          # float64 never takes it
    # three-launch forward (stats, finalize, apply; NCHW after transpose_table)
    ((2, 16, 8, 8, 4), torch.float32, "nchw", 9, False, 132, 4),
    ((2, 6, 5, 7, 3), torch.float32, "nchw", 9, False, 132, 4),         # odd plane: scalar loads
    ((2, 6, 5, 7, 3), torch.float32, "channels_last", 9, False, 132, 3),
    ((2, 6, 5, 7, 3), torch.bfloat16, "strided", 9, False, 132, 4),     # copied to NCHW by the glue
    ((2, 5, 1, 1, 5), torch.float32, "nchw", 9, False, 132, 4),         # one-element groups
    ((2, 5, 1, 1, 5), torch.float32, "channels_last", 9, False, 132, 4),   # 1x1: NCHW-contiguous too
    ((2, 10, 6, 4, 5), torch.float64, "channels_last", 9, False, 132, 3),
    ((2, 16, 8, 8, 4), torch.bfloat16, "channels_last", 9, False, 132, 3),
    ((2, 32, 8, 8, 4), torch.bfloat16, "channels_last", 9, True, 132, 3),
    ((1, 8, 4, 4, 4), torch.float32, "nchw", 7000, False, 132, 4),      # backward opts in to > 48 KB
    ((1, 2, 128, 132, 1), torch.float32, "nchw", 9, False, 132, 4),     # planes of five chunks
    ((1, 40, 20, 20, 8), torch.float32, "channels_last", 9, False, 132, 3),
]


def case_id(case):
    shape, dtype, layout, knots, misaligned, sms, _ = case
    return "-".join([str(shape), str(dtype).removeprefix("torch."), layout, f"K{knots}",
                     *(["u_misaligned"] if misaligned else []), f"sms{sms}"])


def inputs(shape, dtype, layout, knots, misaligned):
    h, u, table, weight, bias, groups = film_inputs(shape, dtype=dtype, layout=layout, knots=knots)
    if misaligned:
        u = torch.empty(u.numel() + 1, dtype=u.dtype)[1:].view_as(u).copy_(u)
        assert u.data_ptr() % 16 != 0
    return h, u, table, weight, bias, groups


@pytest.mark.parametrize("act", ["silu", "identity"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_emulated_cuda_matches_reference(cuda_glue, monkeypatch, case, act):
    shape, dtype, layout, knots, misaligned, sms, forward_launches = case
    monkeypatch.setenv("EMU_SMS", str(sms))
    h, u, table, weight, bias, groups = inputs(shape, dtype, layout, knots, misaligned)
    grad_out = torch.randn(h.shape, generator=torch.Generator().manual_seed(1)).to(dtype)

    before = cuda_glue()
    out, mean, rstd = glue.fused_forward(h, u, table, weight, bias, groups, 1e-5, act)
    assert cuda_glue() - before == forward_launches
    grads = glue.fused_backward(grad_out, h, u, table, weight, bias, mean, rstd, groups, act)

    bound = 1e-12 if dtype == torch.float64 else 1e-5
    _, exact_mean, exact_rstd = reference._groupnorm_film(h.double(), u.double(), table.double(), weight.double(),
                                                          bias.double(), groups, 1e-5, act)
    assert relative_error(mean, exact_mean) < bound and relative_error(rstd, exact_rstd) < bound
    assert out.stride() == h.contiguous(memory_format=glue.memory_format(h)).stride()
    exact = float64_reference(h, u, table, weight, bias, groups, act, grad_out)
    eager = run(reference, h, u, table, weight, bias, groups, act, grad_out)
    assert_accurate(NAMES, (out, *grads), exact, eager, bound)


def assert_accurate(names, results, exact, eager, bound):
    """float32 and float64 results within `bound` of the float64 reference, bfloat16 and float16 ones at most
    twice the eager reference's error."""
    for name, got, x, e in zip(names, results, exact, eager):
        assert got.dtype == e.dtype and got.shape == x.shape, name
        if got.dtype in (torch.bfloat16, torch.float16):
            assert relative_error(got, x) <= 2 * relative_error(e, x), (name, relative_error(got, x),
                                                                        relative_error(e, x))
        else:
            assert relative_error(got, x) < bound, (name, relative_error(got, x))


# groupnorm_silu: (shape, dtype, layout, EMU_SMS, forward launches, backward launches). Without FiLM nothing
# transposes the table and nothing sorts knots: the one-block-per-group paths launch 1 (forward) and 2
# (backward_group_nchw, finalize_group_backward) kernels, the chunked ones 3 and 3.
SILU_CASES = [
    ((2, 16, 8, 8, 4), torch.float32, "nchw", 1, 1, 2),
    ((2, 16, 8, 8, 4), torch.bfloat16, "nchw", 1, 1, 2),
    ((3, 16, 8, 8, 4), torch.float16, "nchw", 1, 1, 2),
    ((2, 12, 8, 8, 4), torch.float32, "nchw", 1, 1, 2),             # three channels a group: slices of two and one
    ((4, 8, 2, 2, 8), torch.float32, "nchw", 1, 1, 2),              # one channel per group
    ((1, 3, 64, 160, 1), torch.float32, "nchw", 1, 1, 2),           # planes of two backward chunks
    ((2, 32, 8, 8, 4), torch.bfloat16, "nchw", 1, 1, 2),
    ((2, 10, 6, 4, 5), torch.float64, "nchw", 1, 3, 3),             # float64 never takes it
    ((2, 16, 8, 8, 4), torch.float32, "nchw", 132, 3, 3),
    ((2, 6, 5, 7, 3), torch.float32, "nchw", 132, 3, 3),            # odd plane: scalar loads
    ((2, 6, 5, 7, 3), torch.float32, "channels_last", 132, 3, 3),
    ((2, 6, 5, 7, 3), torch.bfloat16, "strided", 132, 3, 3),        # copied to NCHW by the glue
    ((2, 5, 1, 1, 5), torch.float32, "nchw", 132, 3, 3),            # one-element groups
    ((2, 10, 6, 4, 5), torch.float64, "channels_last", 132, 3, 3),
    ((2, 16, 8, 8, 4), torch.bfloat16, "channels_last", 132, 3, 3),
    ((2, 16, 8, 8, 4), torch.float16, "channels_last", 132, 3, 3),
    ((1, 40, 20, 20, 8), torch.float32, "channels_last", 132, 3, 3),
]


def silu_case_id(case):
    shape, dtype, layout, sms, _, _ = case
    return "-".join([str(shape), str(dtype).removeprefix("torch."), layout, f"sms{sms}"])


@pytest.mark.parametrize("case", SILU_CASES, ids=silu_case_id)
def test_emulated_cuda_silu_matches_reference(cuda_glue, monkeypatch, case):
    shape, dtype, layout, sms, forward_launches, backward_launches = case
    monkeypatch.setenv("EMU_SMS", str(sms))
    h, weight, bias, groups, grad_out = silu_inputs(shape, dtype=dtype, layout=layout)

    before = cuda_glue()
    out, mean, rstd = glue.fused_silu_forward(h, weight, bias, groups, 1e-5)
    assert cuda_glue() - before == forward_launches
    before = cuda_glue()
    grads = glue.fused_silu_backward(grad_out, h, weight, bias, mean, rstd, groups)
    assert cuda_glue() - before == backward_launches

    bound = 1e-12 if dtype == torch.float64 else 1e-5
    _, exact_mean, exact_rstd = reference._groupnorm_silu(h.double(), weight.double(), bias.double(), groups, 1e-5)
    assert relative_error(mean, exact_mean) < bound and relative_error(rstd, exact_rstd) < bound
    assert out.stride() == h.contiguous(memory_format=glue.memory_format(h)).stride()
    exact = run_silu(reference, h.double(), weight.double(), bias.double(), groups, grad_out.double())
    eager = run_silu(reference, h, weight, bias, groups, grad_out)
    assert_accurate(SILU_NAMES, (out, *grads), exact, eager, bound)


# (shape, dtype, layout, EMU_SMS, whether the backward is bitwise the FiLM path's): per element the kernels
# without FiLM compute what they compute with a zero table (film(n, 0, 0) = n exactly, and the one-block
# backward's folded segments reduce to the channel's own coefficients), and so do the forward statistics and the
# chunked backward's sums; the one-block-per-group backward sums the channels' dn and dn * (h - mean) in
# another order (per thread and over the block, not per knot in sorted order), so there only to rounding.
ZERO_TABLE_CASES = [
    ((2, 12, 8, 8, 4), torch.float32, "nchw", 1, False),
    ((2, 16, 8, 8, 4), torch.bfloat16, "nchw", 1, False),
    ((2, 16, 8, 8, 4), torch.float32, "nchw", 132, True),
    ((2, 6, 5, 7, 3), torch.float16, "nchw", 132, True),
    ((2, 6, 5, 7, 3), torch.float32, "channels_last", 132, True),
    ((2, 16, 8, 8, 4), torch.bfloat16, "channels_last", 132, True),
    ((2, 10, 6, 4, 5), torch.float64, "nchw", 1, True),
]


@pytest.mark.parametrize("shape, dtype, layout, sms, bitwise_backward", ZERO_TABLE_CASES,
                         ids=[f"{c[0]}-{str(c[1]).removeprefix('torch.')}-{c[2]}-sms{c[3]}" for c in ZERO_TABLE_CASES])
def test_emulated_cuda_silu_is_groupnorm_film_with_a_zero_table(cuda_glue, monkeypatch, shape, dtype, layout, sms,
                                                                 bitwise_backward):
    monkeypatch.setenv("EMU_SMS", str(sms))
    h, u, table, weight, bias, groups = film_inputs(shape, dtype=dtype, layout=layout)
    table = torch.zeros_like(table)
    grad_out = torch.randn(h.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    film = glue.fused_forward(h, u, table, weight, bias, groups, 1e-5, "silu")
    silu = glue.fused_silu_forward(h, weight, bias, groups, 1e-5)
    for name, a, b in zip(("out", "mean", "rstd"), silu, film):
        assert torch.equal(a, b), name
    mean, rstd = silu[1:]
    grad_h, _, grad_weight, grad_bias = glue.fused_backward(grad_out, h, u, table, weight, bias, mean, rstd, groups,
                                                            "silu")
    silu_grads = glue.fused_silu_backward(grad_out, h, weight, bias, mean, rstd, groups)
    for name, a, b in zip(SILU_NAMES[1:], silu_grads, (grad_h, grad_weight, grad_bias)):
        if bitwise_backward:
            assert torch.equal(a, b), name
        else:
            assert relative_error(a, b) < (1e-6 if dtype == torch.float32 else 1e-2), (name, relative_error(a, b))


PAD = 4096


def guarded(n, dtype):
    """n elements inside PAD elements of NaN (0xFF for bytes) on each side: (the n elements, everything)."""
    fill = float("nan") if dtype.is_floating_point else 255
    whole = torch.full((n + 2 * PAD,), fill, dtype=dtype)
    return whole[PAD:PAD + n], whole


def assert_untouched(whole, name):
    pad = torch.cat([whole[:PAD], whole[-PAD:]])
    untouched = pad.isnan().all() if whole.dtype.is_floating_point else (pad == 255).all()
    assert untouched, f"a kernel wrote outside {name}"


@pytest.mark.parametrize("shape, dtype, layout, sms, film", [
    ((2, 6, 5, 7, 3), torch.float32, "channels_last", 132, True),
    ((2, 16, 8, 8, 4), torch.bfloat16, "nchw", 1, True),
    ((2, 6, 5, 7, 3), torch.float32, "nchw", 132, False),
    ((2, 16, 8, 8, 4), torch.bfloat16, "nchw", 1, False),
], ids=["float32-channels_last-three_launch", "bfloat16-nchw-one_launch", "float32-nchw-three_launch-no_film",
        "bfloat16-nchw-one_launch-no_film"])
def test_emulated_cuda_writes_only_its_outputs(emulated, monkeypatch, shape, dtype, layout, sms, film):
    """Every output and the workspace inside NaN padding: the forward and backward leave the padding alone
    (without FiLM: no u, table or table gradient, K = 0)."""
    module, _ = emulated
    monkeypatch.setenv("EMU_SMS", str(sms))
    h, u, table, weight, bias, groups = film_inputs(shape, dtype=dtype, layout=layout)
    if not film:
        u = table = None
    h, u, table, weight, bias = glue._prepare(h, u, table, weight, bias)
    B, C, H, W = h.shape
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    channels_last = glue.memory_format(h) == torch.channels_last
    film_shape = (_native.DTYPE_CODES[dtype], B, C, H * W, groups, table.shape[0] if film else 0, channels_last)

    def image():
        view, whole = guarded(h.numel(), dtype)
        return (view.view(B, H, W, C).permute(0, 3, 1, 2) if channels_last else view.view(B, C, H, W)), whole

    def launch(backward, tensors, workspace):
        addresses = tuple(0 if t is None else t.data_ptr() for t in tensors)
        module.groupnorm_film_cuda(backward, film_shape, addresses, 1e-5, True, workspace.data_ptr(), 0, 0)

    workspace_bytes = module.groupnorm_film_cuda_workspace_bytes(film_shape)
    out, out_whole = image()
    mean, mean_whole = guarded(B * groups, compute)
    rstd, rstd_whole = guarded(B * groups, compute)
    workspace, workspace_whole = guarded(workspace_bytes, torch.uint8)
    launch(False, (h, u, table, weight, bias, out, mean, rstd) + (None,) * 5, workspace)
    for whole, name in ((out_whole, "out"), (mean_whole, "mean"), (rstd_whole, "rstd"),
                        (workspace_whole, "the workspace")):
        assert_untouched(whole, name)
    assert out.isfinite().all() and mean.isfinite().all() and rstd.isfinite().all()

    grad_out = torch.randn(h.shape).to(dtype).contiguous(memory_format=glue.memory_format(h))
    grad_h, grad_h_whole = image()
    grad_table, grad_table_whole = guarded(table.numel() if film else 0, compute)
    grad_table.zero_()   # the kernels accumulate into it
    grad_weight, grad_weight_whole = guarded(C, compute)
    grad_bias, grad_bias_whole = guarded(C, compute)
    workspace, workspace_whole = guarded(workspace_bytes, torch.uint8)
    launch(True, (h, u, table, weight, bias, None, mean, rstd, grad_out, grad_h, grad_table if film else None,
                  grad_weight, grad_bias), workspace)
    for whole, name in ((grad_h_whole, "grad_h"), (grad_table_whole, "grad_table"),
                        (grad_weight_whole, "grad_weight"), (grad_bias_whole, "grad_bias"),
                        (workspace_whole, "the workspace")):
        assert_untouched(whole, name)
    for grad in (grad_h, grad_table, grad_weight, grad_bias):
        assert grad.isfinite().all()


@pytest.mark.parametrize("time_map, size", [("constant", (64, 160)), ("ramp", (64, 160)), ("noisy", (32, 64))])
def test_emulated_group_backward_time_maps(cuda_glue, monkeypatch, time_map, size):
    """The one-block-per-group backward sums the table gradient along runs of one knot in each chunk of
    pixels sorted by knot, a range of sorted positions per thread: a constant time map is one run through
    every thread and warp (the deferred first runs, totalled across warps), a ramp gives runs over a few
    threads, a noisy map over all knots runs shorter than a thread's range (16 positions). 64x160: planes of
    two chunks (8192 + 2048 pixels), three channels per group (slices of two and one)."""
    monkeypatch.setenv("EMU_SMS", "1")
    knots, (H, W) = 257, size
    h, _, table, weight, bias, groups = film_inputs((1, 3 if H * W > 8192 else 2, H, W, 1), knots=knots)
    gen = torch.Generator().manual_seed(3)
    u = {"constant": lambda: torch.full((1, 1, H, W), 37.3),
         "ramp": lambda: torch.linspace(-2.0, knots + 1.0, H * W).view(1, 1, H, W),
         "noisy": lambda: torch.rand((1, 1, H, W), generator=gen) * knots}[time_map]()
    grad_out = torch.randn(h.shape, generator=gen)
    out, mean, rstd = glue.fused_forward(h, u, table, weight, bias, groups, 1e-5, "silu")
    grads = glue.fused_backward(grad_out, h, u, table, weight, bias, mean, rstd, groups, "silu")
    exact = float64_reference(h, u, table, weight, bias, groups, "silu", grad_out)
    for name, got, x in zip(NAMES, (out, *grads), exact):
        assert relative_error(got, x) < 1e-5, (name, relative_error(got, x))
