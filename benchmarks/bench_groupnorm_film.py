"""groupnorm_film (DESIGN.md §1.6): the fused op vs the eager reference vs torch.compile(reference).

Three passes, each timed for the three implementations on the same inputs in one run:
  fwd      the forward alone (inference: no autograd graph)
  bwd      torch.autograd.grad of a retained graph: the backward alone, as training runs it
  fwd_bwd  forward, then the gradients of h, table, gn_weight and gn_bias
UNet-like shapes (B, C, H, W) with 32 groups, K = 257 knots and a smooth time map (avg-pooled, as the
model's per-level maps are). On CPU, float32 and the C++ kernel; gpu_cases() adds bfloat16 and the CUDA kernel.
bytes_moved (the fewest bytes each pass must move; roofline in csrc/groupnorm_film_{cpu.cpp,cuda.cu}):
  fwd 2 s n (read h, write out), bwd 3 s n (read grad_out and h, write grad_h), fwd_bwd 5 s n, for n
  elements of s bytes, plus u (4 bytes per pixel) per pass and the table (and its gradient) once.

groupnorm_silu (the same without FiLM, what the UNet's norm_in and norm_out run): the fused op against what it
replaced, F.silu(F.group_norm(...)), fwd and fwd_bwd, at 8x64x128x128 and a small shape, on the GPU where there
is one, else on the CPU.
"""
import pytest
import torch
import torch.nn.functional as F
from common import Case, dtype_name

from svnr_fast import reference
from svnr_fast.ops import backends

SHAPES = [(8, 64, 128, 128), (8, 128, 64, 64), (8, 256, 32, 32)]
DRY_RUN_SHAPES = [(2, 64, 16, 16)]   # gpu_cases on a machine without a GPU: checks the cases build and run
GROUPS, KNOTS, EPS, ACT = 32, 257, 1e-5, "silu"
PASSES = ("fwd", "bwd", "fwd_bwd")
GPU_DTYPES = (torch.float32, torch.bfloat16)


def inputs(shape, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    B, C, H, W = shape
    h = torch.randn(shape, generator=gen, device=device).to(dtype)
    tau = torch.nn.functional.avg_pool2d(torch.rand((B, 1, 2 * H, 2 * W), generator=gen, device=device), 2)
    u = tau * (KNOTS - 1)
    table = torch.randn((KNOTS, 2 * C), generator=gen, device=device) * 0.1
    weight = 1 + 0.1 * torch.randn(C, generator=gen, device=device)
    bias = 0.1 * torch.randn(C, generator=gen, device=device)
    grad_out = torch.randn(shape, generator=gen, device=device).to(dtype)
    return h, u, table, weight, bias, grad_out


def fused(h, u, table, weight, bias):
    return torch.ops.svnr.groupnorm_film(h, u, table, weight, bias, GROUPS, EPS, ACT)[0]


def eager(h, u, table, weight, bias):
    return reference._groupnorm_film(h, u, table, weight, bias, GROUPS, EPS, ACT)[0]


def compiled_reference():
    """torch.compile(reference) as a user gets it: static shapes for the first shape, then a dynamic-shape
    graph that the later shapes share (per dtype and with or without autograd), which keeps the number of
    compilations in the GPU suite down."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 64))
    # the bwd pass reruns a retained graph, which a backward with donated buffers refuses
    torch._functorch.config.donated_buffer = False
    return torch.compile(eager)


def timed(forward, pass_: str, h, u, table, weight, bias, grad_out):
    """The callable that runs `pass_` of `forward` (a function of h, u, table, weight, bias)."""
    if pass_ == "fwd":
        def run_forward():
            with torch.no_grad():
                return forward(h, u, table, weight, bias)
        return run_forward
    leaves = [t.detach().clone().requires_grad_() for t in (h, table, weight, bias)]
    if pass_ == "bwd":
        out = forward(leaves[0], u, *leaves[1:])
        return lambda: torch.autograd.grad(out, leaves, grad_out, retain_graph=True)
    return lambda: torch.autograd.grad(forward(leaves[0], u, *leaves[1:]), leaves, grad_out)


def bytes_moved(pass_: str, shape, dtype) -> int:
    B, C, H, W = shape
    n, s = B * C * H * W, torch.empty(0, dtype=dtype).element_size()
    table = KNOTS * 2 * C * 4
    per_pass = {"fwd": 2 * s * n + 4 * B * H * W + table,
                "bwd": 3 * s * n + 4 * B * H * W + 2 * table}
    per_pass["fwd_bwd"] = per_pass["fwd"] + per_pass["bwd"]
    return per_pass[pass_]


def case(pass_: str, shape, dtype, device, compiled=None) -> Case:
    args = inputs(shape, dtype, device)
    compiled = compiled or compiled_reference()
    return Case(op=f"groupnorm_film_{pass_}", shape="x".join(map(str, shape)), dtype=dtype_name(dtype),
                bytes_moved=bytes_moved(pass_, shape, dtype), fused=timed(fused, pass_, *args),
                eager=timed(eager, pass_, *args), compiled=timed(compiled, pass_, *args))


def require_fused(device: str, op_names=("groupnorm_film", "groupnorm_film_backward")) -> None:
    """The fused column must time the C++/CUDA kernel, not a fallback."""
    device_type = torch.device(device).type
    for op in op_names:
        choice = backends.choose(op, device_type)
        if choice.backend not in ("cpp", "cuda"):
            raise RuntimeError(f"{op} on {device_type} dispatches to {choice.backend} ({choice.reason}), not the "
                               "fused kernel; build svnr_fast._C and unset SVNR_FAST_BACKEND")


def gpu_cases(device: str):
    """The forward of every shape and dtype first (the targets), then forward+backward, then backward, so
    that a suite cut short by its time budget still has the forward rows."""
    require_fused(device)
    compiled = compiled_reference()
    shapes = SHAPES if torch.device(device).type == "cuda" else DRY_RUN_SHAPES
    for pass_ in ("fwd", "fwd_bwd", "bwd"):
        for shape in shapes:
            for dtype in GPU_DTYPES:
                yield case(pass_, shape, dtype, device, compiled)


@pytest.fixture(scope="module")
def compiled_module_wide():
    return compiled_reference()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_copy_of_h(benchmark, shape):
    """The ceiling of the forward: a copy of h moves what a forward must (read h, write the result), so the
    forward's share of copy bandwidth is copy time / forward time, read from this group's rows."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    h = inputs(shape, torch.float32, device)[0].detach()
    out = torch.empty_like(h)
    benchmark.group = f"groupnorm_film_fwd {'x'.join(map(str, shape))} float32"
    benchmark.extra_info["bytes_moved"] = 2 * h.numel() * h.element_size()
    out.copy_(h)
    if device == "cuda":
        benchmark.pedantic(lambda: (out.copy_(h), torch.cuda.synchronize()), rounds=20, warmup_rounds=2)
    else:
        benchmark.pedantic(lambda: out.copy_(h), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["eager", "compiled", "fused"])
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_groupnorm_film(benchmark, compiled_module_wide, shape, pass_, impl):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if impl == "fused":
        try:
            require_fused(device)
        except RuntimeError as err:
            pytest.skip(str(err))
    forward = {"eager": eager, "compiled": compiled_module_wide, "fused": fused}[impl]
    fn = timed(forward, pass_, *inputs(shape, torch.float32, device))
    benchmark.group = f"groupnorm_film_{pass_} {'x'.join(map(str, shape))} float32"
    benchmark.extra_info["bytes_moved"] = bytes_moved(pass_, shape, torch.float32)
    fn()   # compile / warm up outside the timed rounds
    if device == "cuda":
        benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=20, warmup_rounds=2)
    else:
        benchmark.pedantic(fn, rounds=5, warmup_rounds=1)


SILU_SHAPES = [(8, 64, 128, 128), (2, 64, 16, 16)]


def fused_silu(h, weight, bias):
    return torch.ops.svnr.groupnorm_silu(h, weight, bias, GROUPS, EPS)[0]


def eager_silu(h, weight, bias):
    return F.silu(F.group_norm(h, GROUPS, weight, bias, EPS))


@pytest.mark.parametrize("impl", ["eager", "fused"])
@pytest.mark.parametrize("pass_", ("fwd", "fwd_bwd"))
@pytest.mark.parametrize("shape", SILU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_groupnorm_silu(benchmark, shape, pass_, impl):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if impl == "fused":
        try:
            require_fused(device, ("groupnorm_silu", "groupnorm_silu_backward"))
        except RuntimeError as err:
            pytest.skip(str(err))
    forward = {"eager": eager_silu, "fused": fused_silu}[impl]
    h, _, _, weight, bias, grad_out = inputs(shape, torch.float32, device)
    if pass_ == "fwd":
        def fn():
            with torch.no_grad():
                return forward(h, weight, bias)
    else:
        leaves = [t.detach().clone().requires_grad_() for t in (h, weight, bias)]

        def fn():
            return torch.autograd.grad(forward(*leaves), leaves, grad_out)
    benchmark.group = f"groupnorm_silu_{pass_} {'x'.join(map(str, shape))} float32"
    elements = h.numel()
    benchmark.extra_info["bytes_moved"] = {"fwd": 2, "fwd_bwd": 5}[pass_] * 4 * elements   # no u, no table
    fn()
    if device == "cuda":
        benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=20, warmup_rounds=2)
    else:
        benchmark.pedantic(fn, rounds=5 if elements > 1_000_000 else 50, warmup_rounds=1)
