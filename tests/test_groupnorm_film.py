"""The fused groupnorm_film op (DESIGN.md §1.6): the C++ and CUDA kernels against the eager reference.

Forward and every gradient (h, table, gn_weight, gn_bias) through svnr_fast.ops with the backend forced.
Criteria (DESIGN.md §5): float32 max-norm relative error < 1e-5 against the reference run in float64 on
the same inputs; float16/bfloat16 results at most 2x the eager reference's error in the same dtype (both
against that float64 reference); gradcheck in float64. The C++ unit test of the shared per-element math is
csrc/tests/test_math.cpp.
"""
import pytest
import torch
from conftest import requires_cuda
from cpp_isas import isa  # noqa: F401 (fixture)

from svnr_fast import ops, reference
from svnr_fast.nn import GroupNormSiLU, GroupNormSpatialFiLM
from svnr_fast.ops import backends

# (B, C, H, W, groups): odd channel and group counts, 1x1 and odd spatial sizes
SHAPES = [(2, 6, 5, 7, 3), (2, 5, 1, 1, 5), (3, 12, 9, 4, 4), (1, 8, 33, 17, 2), (2, 64, 8, 8, 32)]
LAYOUTS = ["nchw", "channels_last", "strided"]


def relative_error(result: torch.Tensor, expected: torch.Tensor) -> float:
    """max|result - expected| / max|expected|; the absolute error where expected is zero up to rounding
    (grad_h of one-element groups)."""
    diff = (result.double() - expected.double()).abs().max()
    scale = expected.double().abs().max()
    return float(diff / scale) if scale > 1e-9 else float(diff)


def as_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":   # every other column of a tensor twice as wide: neither NCHW nor NHWC
        wide = torch.stack([x, torch.full_like(x, float("nan"))], dim=-1).flatten(-2)
        return wide[..., ::2]
    return x


def film_inputs(shape, dtype=torch.float32, device="cpu", knots=9, layout="nchw", seed=0):
    """h (offset from 0 so that the mean matters), u in knot units covering -1 .. K+1 with pixels exactly at 0,
    at K-1, at interior knots and beyond both ends, a (K, 2C) table, GroupNorm weight and bias."""
    B, C, H, W, groups = shape
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(B, C, H, W, generator=gen) * 1.5 + 0.7
    u = torch.rand(B, 1, H, W, generator=gen) * (knots + 1) - 1
    flat = u.view(-1)
    flat[::5] = 0.0
    flat[1::7] = knots - 1.0
    flat[2::9] = knots + 2.5
    flat[3::11] = -3.0
    flat[4::13] = 2.0
    table = torch.randn(knots, 2 * C, generator=gen) * 0.5
    weight = torch.randn(C, generator=gen) * 0.5 + 1
    bias = torch.randn(C, generator=gen) * 0.3
    h = as_layout(h.to(device, dtype), layout)
    params = torch.float64 if dtype == torch.float64 else torch.float32   # the model's own precision
    return h, *(t.to(device, params) for t in (u, table, weight, bias)), groups


def run(impl, h, u, table, weight, bias, groups, act, grad_out):
    """impl.groupnorm_film and its gradients with respect to (h, table, weight, bias) for grad_out."""
    leaves = [t.detach().clone().requires_grad_() for t in (h, table, weight, bias)]
    out = impl.groupnorm_film(leaves[0], u, leaves[1], leaves[2], leaves[3], groups, 1e-5, act)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return (out.detach(), *grads)


def float64_reference(h, u, table, weight, bias, groups, act, grad_out):
    return run(reference, h.double(), u.double(), table.double(), weight.double(), bias.double(), groups, act,
               grad_out.double())


NAMES = ("out", "grad_h", "grad_table", "grad_weight", "grad_bias")


def check_float32(device, shape, act, layout):
    h, u, table, weight, bias, groups = film_inputs(shape, device=device, layout=layout)
    grad_out = torch.randn(h.shape, generator=torch.Generator().manual_seed(1)).to(device)
    return check_float32_inputs(h, u, table, weight, bias, groups, act, grad_out)


def check_float32_inputs(h, u, table, weight, bias, groups, act, grad_out):
    got = run(ops, h, u, table, weight, bias, groups, act, grad_out)
    expected = float64_reference(h, u, table, weight, bias, groups, act, grad_out)
    for name, g, e in zip(NAMES, got, expected):
        assert g.dtype == torch.float32 and g.shape == e.shape, name
        assert relative_error(g, e) < 1e-5, (name, relative_error(g, e))
    return got


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act", ["silu", "identity"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpp_matches_reference_float32(backend, shape, act, layout):
    backend("cpp")
    out = check_float32("cpu", shape, act, layout)[0]
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cpp_every_instruction_set(backend, isa, layout):
    """The kernels of each instruction set compiled in (tests/cpp_isas.py): planes whose pixel count leaves a
    remainder after the vector widths (4, 8, 16), and one-element groups."""
    backend("cpp")
    for shape in ((1, 8, 33, 17, 2), (2, 5, 1, 1, 5), (2, 12, 16, 16, 4)):
        for act in ("silu", "identity"):
            check_float32("cpu", shape, act, layout)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cpp_low_precision_within_twice_the_eager_error(backend, dtype, layout):
    backend("cpp")
    check_low_precision("cpu", (2, 12, 16, 16, 4), dtype, layout)


def check_low_precision(device, shape, dtype, layout):
    """Results stored in the low dtype (out, grad_h): at most 2x the eager reference's error against float64;
    the table/weight/bias gradients come out in float32 and meet the float32 bound."""
    h, u, table, weight, bias, groups = film_inputs(shape, dtype=dtype, device=device, layout=layout)
    grad_out = torch.randn(h.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    got = run(ops, h, u, table, weight, bias, groups, "silu", grad_out)
    eager = run(reference, h, u, table, weight, bias, groups, "silu", grad_out)
    exact = float64_reference(h, u, table, weight, bias, groups, "silu", grad_out)
    for name, g, e, x in zip(NAMES, got, eager, exact):
        assert g.dtype == e.dtype, name
        if g.dtype == dtype:
            assert relative_error(g, x) <= 2 * relative_error(e, x), (name, relative_error(g, x),
                                                                      relative_error(e, x))
        else:
            assert relative_error(g, x) < 1e-5, (name, relative_error(g, x))


@pytest.mark.parametrize("act", ["silu", "identity"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cpp_gradcheck_float64(backend, act, layout):
    backend("cpp")
    h, u, table, weight, bias, groups = film_inputs((2, 6, 3, 5, 3), dtype=torch.float64, layout=layout)
    inputs = [t.double().requires_grad_() for t in (h, table, weight, bias)]

    def f(h_, table_, weight_, bias_):
        return ops.groupnorm_film(h_, u.double(), table_, weight_, bias_, groups, 1e-5, act)

    assert torch.autograd.gradcheck(f, inputs)


def test_cpp_float64_matches_reference(backend):
    backend("cpp")
    h, u, table, weight, bias, groups = film_inputs((2, 10, 7, 6, 5), dtype=torch.float64)
    grad_out = torch.randn(h.shape, dtype=torch.float64)
    got = run(ops, h, u, table, weight, bias, groups, "silu", grad_out)
    expected = float64_reference(h, u, table, weight, bias, groups, "silu", grad_out)
    for name, g, e in zip(NAMES, got, expected):
        assert g.dtype == torch.float64
        assert relative_error(g, e) < 1e-12, name


@pytest.mark.parametrize("film", [True, False], ids=["groupnorm_film", "groupnorm_silu"])
def test_an_undefined_gradient_of_the_result_gives_zero_gradients(backend, film):
    """A graph that sends the op's result no gradient (None) gets zero gradients of its inputs, as when
    autograd materialized that gradient as zeros."""
    backend("cpp")

    class NoGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return None

    h, u, table, weight, bias, groups = film_inputs((2, 6, 5, 4, 3))
    if film:
        inputs = [t.requires_grad_() for t in (h, table, weight, bias)]
        out = ops.groupnorm_film(inputs[0], u, *inputs[1:], groups)
    else:
        inputs = [t.requires_grad_() for t in (h, weight, bias)]
        out = ops.groupnorm_silu(*inputs, groups)
    grads = torch.autograd.grad(NoGradient.apply(out).sum(), inputs)
    for g, t in zip(grads, inputs):
        assert g.shape == t.shape and not g.any()


def test_reference_backward_is_the_autograd_of_the_reference():
    h, u, table, weight, bias, groups = film_inputs((2, 6, 5, 4, 3), dtype=torch.float64)
    grad_out = torch.randn(h.shape, dtype=torch.float64)
    for act in ("silu", "identity"):
        autograd = run(reference, h, u, table, weight, bias, groups, act, grad_out)[1:]
        _, mean, rstd = reference._groupnorm_film(h, u, table, weight, bias, groups, 1e-5, act)
        written_out = reference._groupnorm_film_backward(grad_out, h, u, table, weight, bias, mean, rstd, groups, act)
        for g, e in zip(written_out, autograd):
            assert relative_error(g, e) < 1e-12


def test_u_is_clamped_to_the_table(backend):
    backend("cpp")
    h, _, table, weight, bias, groups = film_inputs((1, 6, 1, 4, 3))
    K = table.shape[0]

    def at(values):
        u = torch.tensor(values, dtype=torch.float32).view(1, 1, 1, 4)
        return ops.groupnorm_film(h, u, table, weight, bias, groups, act="identity")

    assert torch.equal(at([-5.0, -0.5, K - 1.0, K + 7.0]), at([0.0, 0.0, K - 1.0, K - 1.0]))
    # at an interior knot the lerp is the table row itself: pre = n * (1 + scale_k) + shift_k
    normed = torch.nn.functional.group_norm(h, groups, weight, bias, 1e-5)
    out = at([3.0, 3.0, 3.0, 3.0])
    C = h.shape[1]
    expected = normed * (1 + table[3, :C].view(1, C, 1, 1)) + table[3, C:].view(1, C, 1, 1)
    assert relative_error(out, expected) < 1e-6


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_results_do_not_depend_on_the_thread_count(backend, layout):
    backend("cpp")
    h, u, table, weight, bias, groups = film_inputs((4, 16, 40, 30, 4), layout=layout)
    grad_out = torch.randn(h.shape)
    single, several = on_one_and_several_threads(lambda: run(ops, h, u, table, weight, bias, groups, "silu",
                                                             grad_out))
    for name, a, b in zip(NAMES, single, several):
        assert torch.equal(a, b), name


def on_one_and_several_threads(fn):
    """(fn() on one torch thread, fn() on at least two)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = fn()
        torch.set_num_threads(max(2, threads))
        return single, fn()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck_cpp_backend(backend, layout):
    backend("cpp")
    h, u, table, weight, bias, groups = film_inputs((2, 6, 5, 7, 3), layout=layout)
    h, table, weight, bias = (t.requires_grad_() for t in (h, table, weight, bias))
    torch.library.opcheck(torch.ops.svnr.groupnorm_film, (h, u, table, weight, bias, groups, 1e-5, "silu"))
    _, mean, rstd = torch.ops.svnr.groupnorm_film(h, u, table, weight, bias, groups, 1e-5, "silu")
    grad_out = torch.randn(h.shape)
    torch.library.opcheck(torch.ops.svnr.groupnorm_film_backward,
                          (grad_out, h.detach(), u, table.detach(), weight.detach(), bias.detach(), mean, rstd,
                           groups, "identity"))


def test_automatic_choice_on_cpu_is_the_cpp_kernel(backend):
    backend("auto")
    for op in ("groupnorm_film", "groupnorm_film_backward"):
        assert backends.choose(op, "cpu").backend == "cpp"


def test_forced_reference_runs_the_reference(backend):
    backend("reference")
    for op in ("groupnorm_film", "groupnorm_film_backward"):
        assert backends.choose(op, "cpu").backend == "reference"
    h, u, table, weight, bias, groups = film_inputs((2, 6, 5, 7, 3), layout="channels_last")
    grad_out = torch.randn(h.shape)
    got = run(ops, h, u, table, weight, bias, groups, "silu", grad_out)
    expected = run(reference, h, u, table, weight, bias, groups, "silu", grad_out)
    assert torch.equal(got[0], expected[0])
    for name, g, e in zip(NAMES[1:], got[1:], expected[1:]):   # written-out backward vs autograd
        assert relative_error(g, e) < 1e-5, name


def test_forced_cpp_without_the_extension_is_a_clear_error(backend, monkeypatch):
    backend("cpp")
    monkeypatch.setattr(backends, "extension", lambda: (None, "ImportError: svnr_fast._C missing"))
    h, u, table, weight, bias, groups = film_inputs((1, 4, 3, 3, 2))
    with pytest.raises(backends.BackendUnavailable, match="SVNR_FAST_BACKEND=cpp .* svnr_fast._C is not built"):
        ops.groupnorm_film(h, u, table, weight, bias, groups)


def test_extension_rejects_a_bad_shape_with_a_value_error():
    ext, _ = backends.extension()
    no_tensors = (0,) * 13
    with pytest.raises(ValueError, match=r"groups \(4\) must divide the channels \(6\)"):
        ext.groupnorm_film_cpu(False, (0, 1, 6, 9, 4, 9, 0), no_tensors, 1e-5, True, 1)
    with pytest.raises(ValueError, match="at least 2 rows"):
        ext.groupnorm_film_cpu(True, (0, 1, 6, 9, 3, 1, 0), no_tensors, 1e-5, True, 1)
    if hasattr(ext, "groupnorm_film_cuda"):   # checked before any CUDA call; K = 0 is the variant without FiLM
        with pytest.raises(ValueError, match="at least 2 rows"):
            ext.groupnorm_film_cuda(False, (0, 1, 6, 9, 3, 1, 0), no_tensors, 1e-5, True, 0, 0, 0)
        assert ext.groupnorm_film_cuda_workspace_bytes((0, 1, 6, 9, 3, 0, 0)) >= 0


def test_empty_inputs(backend):
    backend("cpp")
    for shape in ((0, 4, 3, 3, 2), (2, 4, 0, 3, 2)):
        h, u, table, weight, bias, groups = film_inputs(shape)
        h.requires_grad_()
        out = ops.groupnorm_film(h, u, table, weight, bias, groups)
        assert out.shape == h.shape
        out.sum().backward()
        assert h.grad.shape == h.shape


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_module_through_the_fused_op_equals_the_reference(backend, layout):
    h, u, table, _, _, _ = film_inputs((2, 8, 6, 5, 4), layout=layout)
    torch.manual_seed(3)
    module = GroupNormSpatialFiLM(8, groups=4)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.3, 0.3)
    grad_out = torch.randn(h.shape)
    results = {}
    for name in ("cpp", "reference"):
        backend(name)
        module.zero_grad()
        h_leaf, table_leaf = h.clone().requires_grad_(), table.clone().requires_grad_()
        out = module(h_leaf, u, table_leaf)
        out.backward(grad_out)
        results[name] = (out.detach(), h_leaf.grad, table_leaf.grad, module.weight.grad.clone(),
                         module.bias.grad.clone())
    for name, got, expected in zip(NAMES, results["cpp"], results["reference"]):
        assert relative_error(got, expected) < 1e-5, name


# ---------------------------------------------------------------------------------------------------
# groupnorm_silu: GroupNorm + SiLU without FiLM (the C++ kernel's WithFilm = false instantiations)
# ---------------------------------------------------------------------------------------------------

SILU_NAMES = ("out", "grad_h", "grad_weight", "grad_bias")


def run_silu(impl, h, weight, bias, groups, grad_out):
    """impl.groupnorm_silu and its gradients with respect to (h, weight, bias) for grad_out."""
    leaves = [t.detach().clone().requires_grad_() for t in (h, weight, bias)]
    out = impl.groupnorm_silu(*leaves, groups, 1e-5)
    return (out.detach(), *torch.autograd.grad(out, leaves, grad_out))


def silu_inputs(shape, dtype=torch.float32, layout="nchw"):
    h, _, _, weight, bias, groups = film_inputs(shape, dtype=dtype, layout=layout)
    grad_out = torch.randn(h.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    return h, weight, bias, groups, grad_out


def check_silu_float32(shape, layout):
    h, weight, bias, groups, grad_out = silu_inputs(shape, layout=layout)
    got = run_silu(ops, h, weight, bias, groups, grad_out)
    expected = run_silu(reference, h.double(), weight.double(), bias.double(), groups, grad_out.double())
    for name, g, e in zip(SILU_NAMES, got, expected):
        assert g.dtype == torch.float32 and g.shape == e.shape, name
        assert relative_error(g, e) < 1e-5, (name, relative_error(g, e))
    return got


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_silu_cpp_matches_reference_float32(fused_cpu, shape, layout):
    out = check_silu_float32(shape, layout)[0]
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                             torch.contiguous_format)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_silu_cpp_every_instruction_set(fused_cpu, isa, layout):
    for shape in ((1, 8, 33, 17, 2), (2, 5, 1, 1, 5), (2, 12, 16, 16, 4)):
        check_silu_float32(shape, layout)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_silu_cpp_low_precision_within_twice_the_eager_error(fused_cpu, dtype, layout):
    check_silu_low_precision("cpu", (2, 12, 16, 16, 4), dtype, layout)


def check_silu_low_precision(device, shape, dtype, layout):
    """The fused op on `device` within twice the error of the eager reference on the CPU (same dtype)."""
    h, weight, bias, groups, grad_out = silu_inputs(shape, dtype=dtype, layout=layout)
    got = run_silu(ops, h.to(device), weight.to(device), bias.to(device), groups, grad_out.to(device))
    eager = run_silu(reference, h, weight, bias, groups, grad_out)
    exact = run_silu(reference, h.double(), weight.double(), bias.double(), groups, grad_out.double())
    for name, g, e, x in zip(SILU_NAMES, got, eager, exact):
        assert g.dtype == e.dtype, name
        bound = 2 * relative_error(e, x) if g.dtype == dtype else 1e-5
        assert relative_error(g.cpu(), x) <= bound, (name, relative_error(g.cpu(), x), bound)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_silu_cpp_gradcheck_float64(fused_cpu, layout):
    h, weight, bias, groups, _ = silu_inputs((2, 6, 3, 5, 3), dtype=torch.float64, layout=layout)
    inputs = [t.double().requires_grad_() for t in (h, weight, bias)]
    assert torch.autograd.gradcheck(lambda *args: ops.groupnorm_silu(*args, groups), inputs)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_silu_is_groupnorm_film_with_a_zero_table(fused_cpu, layout):
    """The kernels without FiLM compute what they compute with a zero table: film(n, 0, 0) = n exactly."""
    h, u, table, weight, bias, groups = film_inputs((2, 12, 16, 16, 4), layout=layout)
    grad_out = torch.randn(h.shape)
    film = run(ops, h, u, torch.zeros_like(table), weight, bias, groups, "silu", grad_out)
    silu = run_silu(ops, h, weight, bias, groups, grad_out)
    for name, a, b in zip(SILU_NAMES, silu, film[:2] + film[3:]):
        assert torch.equal(a, b), name


def test_silu_reference_backward_is_the_autograd_of_group_norm_and_silu():
    h, weight, bias, groups, grad_out = silu_inputs((2, 6, 5, 4, 3), dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (h, weight, bias)]
    out = torch.nn.functional.silu(torch.nn.functional.group_norm(leaves[0], groups, leaves[1], leaves[2], 1e-5))
    autograd = torch.autograd.grad(out, leaves, grad_out)
    _, mean, rstd = reference._groupnorm_silu(h, weight, bias, groups, 1e-5)
    written_out = reference._groupnorm_silu_backward(grad_out, h, weight, bias, mean, rstd, groups)
    for g, e in zip(written_out, autograd):
        assert relative_error(g, e) < 1e-12


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_silu_results_do_not_depend_on_the_thread_count(fused_cpu, layout):
    h, weight, bias, groups, grad_out = silu_inputs((4, 16, 40, 30, 4), layout=layout)
    single, several = on_one_and_several_threads(lambda: run_silu(ops, h, weight, bias, groups, grad_out))
    for name, a, b in zip(SILU_NAMES, single, several):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_silu_opcheck_cpp_backend(fused_cpu, layout):
    h, weight, bias, groups, grad_out = silu_inputs((2, 6, 5, 7, 3), layout=layout)
    h, weight, bias = (t.requires_grad_() for t in (h, weight, bias))
    torch.library.opcheck(torch.ops.svnr.groupnorm_silu, (h, weight, bias, groups, 1e-5))
    _, mean, rstd = torch.ops.svnr.groupnorm_silu(h, weight, bias, groups, 1e-5)
    torch.library.opcheck(torch.ops.svnr.groupnorm_silu_backward,
                          (grad_out, h.detach(), weight.detach(), bias.detach(), mean, rstd, groups))


def test_silu_automatic_choice(backend):
    backend("auto")
    expected_cpu = "cpp" if backends.extension()[0] is not None else "reference"
    for op in ("groupnorm_silu", "groupnorm_silu_backward"):
        assert backends.choose(op, "cpu").backend == expected_cpu
        # CUDA tensors: groupnorm_film's CUDA kernel without FiLM where the extension has it, else torch's own
        # kernels through the reference
        assert "cuda" in backends.IMPLEMENTATIONS[op]
        expected_cuda = "cuda" if backends.unavailable_reason("cuda", op, "cuda") is None else "reference"
        assert backends.choose(op, "cuda").backend == expected_cuda


def test_silu_empty_inputs(fused_cpu):
    for shape in ((0, 4, 3, 3, 2), (2, 4, 0, 3, 2)):
        h, weight, bias, groups, _ = silu_inputs(shape)
        h.requires_grad_()
        out = ops.groupnorm_silu(h, weight, bias, groups)
        assert out.shape == h.shape
        out.sum().backward()
        assert h.grad.shape == h.shape


def test_silu_bad_arguments_say_what_was_wrong():
    h, weight, bias, _, _ = silu_inputs((1, 6, 3, 3, 3))
    with pytest.raises(ValueError, match="groups must be a positive int dividing the 6 channels"):
        ops.groupnorm_silu(h, weight, bias, 4)
    with pytest.raises(ValueError, match=r"gn_bias must have shape \(6,\)"):
        ops.groupnorm_silu(h, weight, bias[:5], 3)
    with pytest.raises(ValueError, match="h must have 4 dimensions"):
        ops.groupnorm_silu(h[0], weight, bias, 3)


def test_silu_module_is_a_drop_in_for_group_norm_then_silu(fused_cpu):
    """Same parameter names (a state dict of nn.GroupNorm loads), same results, same gradients."""
    torch.manual_seed(3)
    norm = torch.nn.GroupNorm(4, 8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.3, 0.3)
    module = GroupNormSiLU(4, 8)
    module.load_state_dict(norm.state_dict())
    h = torch.randn(2, 8, 6, 5) * 2 + 1
    grad_out = torch.randn(h.shape)
    results = []
    for m in (module, torch.nn.Sequential(norm, torch.nn.SiLU())):
        h_leaf = h.clone().requires_grad_()
        out = m(h_leaf)
        out.backward(grad_out)
        results.append((out.detach(), h_leaf.grad))
    for name, got, expected in zip(SILU_NAMES, results[0], results[1]):
        assert relative_error(got, expected) < 1e-5, name
    assert relative_error(module.weight.grad, norm.weight.grad) < 1e-5
    assert relative_error(module.bias.grad, norm.bias.grad) < 1e-5


# ---------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU; benchmarks/gpu_suite.py runs them on the GPU machine)
# ---------------------------------------------------------------------------------------------------

# (8, 64, 32, 32, 32) and (5, 64, 128, 128, 32) have enough groups for the one-launch forward on an H100
# (32768 elements per group is its limit); the others take the three-launch path
CUDA_SHAPES = [(2, 6, 5, 7, 3), (2, 5, 1, 1, 5), (3, 10, 33, 65, 5), (2, 64, 64, 64, 32), (4, 128, 32, 32, 32),
               (2, 256, 16, 16, 32), (8, 64, 32, 32, 32), (5, 64, 128, 128, 32)]


@pytest.mark.parametrize("shape", CUDA_SHAPES)
@pytest.mark.parametrize("act", ["silu", "identity"])
@pytest.mark.parametrize("layout", LAYOUTS)
@requires_cuda
@pytest.mark.cuda
def test_cuda_matches_reference_float32(backend, shape, act, layout):
    backend("cuda")
    out = check_float32("cuda", shape, act, layout)[0]
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                             torch.contiguous_format)


@pytest.mark.parametrize("shape", [(2, 12, 16, 16, 4), (8, 64, 32, 32, 32), (3, 10, 33, 65, 5)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@requires_cuda
@pytest.mark.cuda
def test_cuda_low_precision_within_twice_the_eager_error(backend, shape, dtype, layout):
    backend("cuda")
    check_low_precision("cuda", shape, dtype, layout)


@pytest.mark.parametrize("knots", [2500, 2600])
@pytest.mark.parametrize("u_aligned", [True, False])
@requires_cuda
@pytest.mark.cuda
def test_cuda_one_launch_forward_limits(backend, knots, u_aligned):
    """(8, 64, 8, 8, 32) has enough groups for the one-launch forward, which keeps a group's table columns in
    shared memory: 2 * 2 channels * 2500 knots * 4 bytes fit its 40 KB, 2600 knots do not (three launches).
    u 16-byte aligned takes the vector loads of u, u one float off takes the scalar path."""
    backend("cuda")
    h, u, table, weight, bias, groups = film_inputs((8, 64, 8, 8, 32), device="cuda", knots=knots)
    if not u_aligned:
        u = torch.empty(u.numel() + 1, device="cuda")[1:].view_as(u).copy_(u)
        assert u.data_ptr() % 16 != 0
    grad_out = torch.randn(h.shape, generator=torch.Generator().manual_seed(1)).to("cuda")
    check_float32_inputs(h, u, table, weight, bias, groups, "silu", grad_out)


@requires_cuda
@pytest.mark.cuda
def test_cuda_float64_and_many_knots(backend):
    """float64 on the GPU, and a table too tall for 48 KB of shared memory (the NCHW backward opts in)."""
    backend("cuda")
    for dtype, knots in ((torch.float64, 9), (torch.float32, 7000)):
        h, u, table, weight, bias, groups = film_inputs((2, 8, 12, 20, 4), dtype=dtype, device="cuda",
                                                        knots=knots)
        grad_out = torch.randn(h.shape, dtype=dtype, device="cuda")
        got = run(ops, h, u, table, weight, bias, groups, "silu", grad_out)
        expected = float64_reference(h, u, table, weight, bias, groups, "silu", grad_out)
        for name, g, e in zip(NAMES, got, expected):
            assert relative_error(g, e) < (1e-12 if dtype == torch.float64 else 1e-5), (name, dtype)


@requires_cuda
@pytest.mark.cuda
def test_cuda_runs_on_the_current_stream(backend):
    backend("cuda")
    h, u, table, weight, bias, groups = film_inputs((2, 32, 48, 48, 8), device="cuda")
    grad_out = torch.randn(h.shape, device="cuda")
    expected = run(ops, h, u, table, weight, bias, groups, "silu", grad_out)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = run(ops, h, u, table, weight, bias, groups, "silu", grad_out)
    torch.cuda.current_stream().wait_stream(stream)
    for name, g, e in zip(NAMES, got, expected):
        assert relative_error(g, e) < 1e-6, name


@requires_cuda
@pytest.mark.cuda
def test_cuda_opcheck_and_automatic_choice(backend):
    backend("auto")
    assert backends.choose("groupnorm_film", "cuda").backend == "cuda"
    h, u, table, weight, bias, groups = film_inputs((2, 6, 5, 7, 3), device="cuda")
    h, table, weight, bias = (t.requires_grad_() for t in (h, table, weight, bias))
    torch.library.opcheck(torch.ops.svnr.groupnorm_film, (h, u, table, weight, bias, groups, 1e-5, "silu"))


# (2, 64, 24, 20, 32) takes the chunked kernels, (8, 64, 32, 32, 32) and (5, 64, 128, 128, 32) the
# one-block-per-group ones on an H100 (NCHW)
CUDA_SILU_SHAPES = [(2, 64, 24, 20, 32), (2, 6, 5, 7, 3), (8, 64, 32, 32, 32), (5, 64, 128, 128, 32)]


@pytest.mark.parametrize("shape", CUDA_SILU_SHAPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@requires_cuda
@pytest.mark.cuda
def test_cuda_silu_matches_reference_float32(backend, shape, layout):
    """groupnorm_silu on CUDA tensors: groupnorm_film's CUDA kernels without FiLM."""
    backend("cuda")
    h, weight, bias, groups, grad_out = silu_inputs(shape, layout=layout)
    got = run_silu(ops, h.cuda(), weight.cuda(), bias.cuda(), groups, grad_out.cuda())
    expected = run_silu(reference, h.double(), weight.double(), bias.double(), groups, grad_out.double())
    for name, g, e in zip(SILU_NAMES, got, expected):
        assert relative_error(g.cpu(), e) < 1e-5, name


@pytest.mark.parametrize("shape", [(2, 12, 16, 16, 4), (8, 64, 32, 32, 32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@requires_cuda
@pytest.mark.cuda
def test_cuda_silu_low_precision_within_twice_the_eager_error(backend, shape, dtype, layout):
    backend("cuda")
    check_silu_low_precision("cuda", shape, dtype, layout)
