"""GroupNorm + spatial FiLM (+ SiLU) (DESIGN.md §1.6): svnr::groupnorm_film and svnr::groupnorm_film_backward;
and the same without FiLM, GroupNorm + SiLU: svnr::groupnorm_silu and svnr::groupnorm_silu_backward.

Kernels: csrc/groupnorm_film_cpu.cpp (C++, CPU tensors) and csrc/groupnorm_film_cuda.cu (CUDA), reached
through the glue at the end of this file. Reference: svnr_fast.reference._groupnorm_film /
_groupnorm_film_backward.

The glue allocates every output with torch and hands the shape, the tensors' addresses and the thread count
(CPU) or the current stream (CUDA) to svnr_fast._C, which builds one GroupNormFilmArgs from them
(csrc/svnr_kernels.h). Layouts: h in NCHW or channels_last (NHWC) memory is read in place and the results come
out in the same layout. Any other strides cost one copy of h into NCHW (and of grad_out into h's layout in the
backward). u, the table, weight and bias are converted to the compute dtype (float64 for float64 data, else
float32): u is 1/C of h, the others are tiny; the kernels take the (K, 2C) table as it is.

groupnorm_silu is its own op rather than groupnorm_film with optional u and table: its schema, fake kernel and
autograd have no FiLM arguments or table gradient to carry as None, and on devices without a fused kernel the
automatic choice gives it torch's own kernels. Its kernels are groupnorm_film's C++ and CUDA kernels with
K = 0, whose WithFilm = false instantiations read neither u nor a table and build no knot records or table
gradient (routing GroupNorm + SiLU through groupnorm_film with a zero table gathers and lerps that table for
nothing: slower than torch at small shapes).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import reference
from . import _checks, _native, backends


def memory_format(h: Tensor) -> torch.memory_format:
    """The layout the kernels read h in and write their image results in: NHWC when h is channels_last
    (and not also NCHW-contiguous), else NCHW."""
    if not h.is_contiguous() and h.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _statistics_like(h: Tensor, groups: int) -> Tensor:
    return h.new_empty((h.shape[0], groups), dtype=_checks.compute_dtype(h.dtype))


def _image_like(h: Tensor) -> Tensor:
    """An output laid out like the fused kernels write it: NHWC for channels_last h, else NCHW."""
    return torch.empty(h.shape, dtype=h.dtype, device=h.device).contiguous(memory_format=memory_format(h))


def _reference_forward(h, u, table, gn_weight, gn_bias, groups, eps, act):
    out, mean, rstd = reference._groupnorm_film(h, u, table, gn_weight, gn_bias, groups, eps, act)
    return out.contiguous(memory_format=memory_format(h)), mean, rstd


def _reference_backward(grad_out, h, u, table, gn_weight, gn_bias, mean, rstd, groups, act):
    grad_h, *grads = reference._groupnorm_film_backward(grad_out, h, u, table, gn_weight, gn_bias, mean, rstd,
                                                         groups, act)
    return (grad_h.contiguous(memory_format=memory_format(h)), *grads)


backends.define(
    "groupnorm_film",
    "(Tensor h, Tensor u, Tensor table, Tensor gn_weight, Tensor gn_bias, int groups, float eps, str act) "
    "-> (Tensor, Tensor, Tensor)",
    fake=lambda h, u, table, gn_weight, gn_bias, groups, eps, act: (
        _image_like(h), _statistics_like(h, groups), _statistics_like(h, groups)),
    reference=_reference_forward, cpp="svnr_fast.ops.groupnorm_film:fused_forward",
    cuda="svnr_fast.ops.groupnorm_film:fused_forward_cuda")
backends.define(
    "groupnorm_film_backward",
    "(Tensor grad_out, Tensor h, Tensor u, Tensor table, Tensor gn_weight, Tensor gn_bias, Tensor mean, "
    "Tensor rstd, int groups, str act) -> (Tensor, Tensor, Tensor, Tensor)",
    fake=lambda grad_out, h, u, table, gn_weight, gn_bias, mean, rstd, groups, act: (
        _image_like(h), torch.empty_like(table), torch.empty_like(gn_weight), torch.empty_like(gn_bias)),
    reference=_reference_backward, cpp="svnr_fast.ops.groupnorm_film:fused_backward",
    cuda="svnr_fast.ops.groupnorm_film:fused_backward_cuda")


def _reference_silu_forward(h, gn_weight, gn_bias, groups, eps):
    out, mean, rstd = reference._groupnorm_silu(h, gn_weight, gn_bias, groups, eps)
    return out.contiguous(memory_format=memory_format(h)), mean, rstd


def _reference_silu_backward(grad_out, h, gn_weight, gn_bias, mean, rstd, groups):
    grad_h, *grads = reference._groupnorm_silu_backward(grad_out, h, gn_weight, gn_bias, mean, rstd, groups)
    return (grad_h.contiguous(memory_format=memory_format(h)), *grads)


backends.define(
    "groupnorm_silu",
    "(Tensor h, Tensor gn_weight, Tensor gn_bias, int groups, float eps) -> (Tensor, Tensor, Tensor)",
    fake=lambda h, gn_weight, gn_bias, groups, eps: (
        _image_like(h), _statistics_like(h, groups), _statistics_like(h, groups)),
    reference=_reference_silu_forward, cpp="svnr_fast.ops.groupnorm_film:fused_silu_forward",
    cuda="svnr_fast.ops.groupnorm_film:fused_silu_forward_cuda")
backends.define(
    "groupnorm_silu_backward",
    "(Tensor grad_out, Tensor h, Tensor gn_weight, Tensor gn_bias, Tensor mean, Tensor rstd, int groups) "
    "-> (Tensor, Tensor, Tensor)",
    fake=lambda grad_out, h, gn_weight, gn_bias, mean, rstd, groups: (
        _image_like(h), torch.empty_like(gn_weight), torch.empty_like(gn_bias)),
    reference=_reference_silu_backward, cpp="svnr_fast.ops.groupnorm_film:fused_silu_backward",
    cuda="svnr_fast.ops.groupnorm_film:fused_silu_backward_cuda")


def _setup_context(ctx, inputs, output):
    h, u, table, gn_weight, gn_bias, groups, eps, act = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(h, u, table, gn_weight, gn_bias, mean, rstd)
    ctx.groups, ctx.act = groups, act


def _backward(ctx, grad_out, grad_mean, grad_rstd):
    # mean and rstd are saved statistics, not results: they carry no gradient, and autograd materializes no
    # zeros for them (set_materialize_grads(False)); an undefined gradient of the result counts as zero, as a
    # materialized one did
    h, u, table, gn_weight, gn_bias, mean, rstd = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(h)
    grad_h, grad_table, grad_weight, grad_bias = torch.ops.svnr.groupnorm_film_backward(
        grad_out, h, u, table, gn_weight, gn_bias, mean, rstd, ctx.groups, ctx.act)
    return grad_h, None, grad_table, grad_weight, grad_bias, None, None, None


backends.register_autograd("groupnorm_film", _backward, _setup_context)


def _setup_silu_context(ctx, inputs, output):
    h, gn_weight, gn_bias, groups, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(h, gn_weight, gn_bias, mean, rstd)
    ctx.groups = groups


def _silu_backward(ctx, grad_out, grad_mean, grad_rstd):
    # as _backward: no zeros materialized for mean and rstd, an undefined gradient of the result is zero
    h, gn_weight, gn_bias, mean, rstd = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(h)
    grad_h, grad_weight, grad_bias = torch.ops.svnr.groupnorm_silu_backward(grad_out, h, gn_weight, gn_bias, mean,
                                                                            rstd, ctx.groups)
    return grad_h, grad_weight, grad_bias, None, None


backends.register_autograd("groupnorm_silu", _silu_backward, _setup_silu_context)


def groupnorm_film(h: Tensor, u: Tensor, table: Tensor, gn_weight: Tensor, gn_bias: Tensor, groups: int,
                   eps: float = 1e-5, act: str = "silu") -> Tensor:
    """act((GroupNorm(h) * gn_weight + gn_bias) * (1 + scale(u)) + shift(u)) (DESIGN.md §1.6).

    Gradients flow to h, table, gn_weight and gn_bias (not u).
    """
    _checks.groupnorm_film_args(h, u, table, gn_weight, gn_bias, groups, eps, act)
    return torch.ops.svnr.groupnorm_film(h, u, table, gn_weight, gn_bias, groups, float(eps), act)[0]


def groupnorm_silu(h: Tensor, gn_weight: Tensor, gn_bias: Tensor, groups: int, eps: float = 1e-5) -> Tensor:
    """SiLU(GroupNorm(h) * gn_weight + gn_bias): groupnorm_film without its FiLM.

    Gradients flow to h, gn_weight and gn_bias.
    """
    _checks.groupnorm_silu_args(h, gn_weight, gn_bias, groups, eps)
    return torch.ops.svnr.groupnorm_silu(h, gn_weight, gn_bias, groups, float(eps))[0]


# ---------------------------------------------------------------------------------------------------
# Glue of the C++ and CUDA kernels
# ---------------------------------------------------------------------------------------------------

def _prepare(h: Tensor, u: Tensor | None, table: Tensor | None, gn_weight: Tensor, gn_bias: Tensor):
    """h in the layout the kernels read (memory_format(h): NCHW or channels_last h as it is, any other strides
    copied into NCHW); u (B, H*W), table, weight and bias contiguous in the compute dtype (u and table None
    without FiLM)."""
    if not h.is_contiguous() and not h.is_contiguous(memory_format=torch.channels_last):
        h = h.contiguous()
    dtype = _checks.compute_dtype(h.dtype)
    # a contiguous (B, 1, H, W) u is laid out as (B, H*W)
    return h, _in(u, dtype), _in(table, dtype), _in(gn_weight, dtype), _in(gn_bias, dtype)


def _in(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """t contiguous in `dtype`: t itself when it already is (the test costs less than the conversion calls)."""
    return t if t is None or t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _run(ext, backward: bool, shape: tuple, addresses: tuple, eps: float, silu: bool, h: Tensor) -> None:
    """The CPU kernel, with the threads torch uses."""
    ext.groupnorm_film_cpu(backward, shape, addresses, eps, silu, _native.threads())


def _run_cuda(ext, backward: bool, shape: tuple, addresses: tuple, eps: float, silu: bool, h: Tensor) -> None:
    """The CUDA kernel, on torch's current stream of h's device, with a workspace; temporaries freed after the
    launch (the workspace, converted inputs) are safe, since the caching allocator hands their memory only to
    work queued later on the same stream. The workspace is not kept between calls: the extension releases the
    GIL, so two threads may queue passes on one stream at once."""
    device = h.get_device()
    # new_empty with the size as an argument, not a tuple: fewer argument conversions than torch.empty
    workspace = h.new_empty(_workspace_bytes(ext, shape), dtype=torch.uint8)
    ext.groupnorm_film_cuda(backward, shape, addresses, eps, silu, workspace.data_ptr(), device,
                            backends.cuda_stream(device))


@functools.lru_cache(maxsize=64)
def _workspace_bytes(ext, shape: tuple) -> int:
    return ext.groupnorm_film_cuda_workspace_bytes(shape)


def _launch(backward: bool, groups: int, tensors: tuple, eps: float, act: str, run) -> None:
    """Runs one pass on `tensors` = (h, u, table, weight, bias, out, mean, rstd, grad_out, grad_h, grad_table,
    grad_weight, grad_bias), None where the pass has none (the order of the extension's `tensors`), with the
    kernel of `run` (the CPU one, `_run`, when None). No table: no FiLM (K = 0)."""
    h, table = tensors[0], tensors[2]
    B, C, H, W = h.shape
    # h is NCHW-contiguous or channels_last (_prepare)
    shape = (_native.DTYPE_CODES[h.dtype], B, C, H * W, groups, 0 if table is None else table.shape[0],
             not h.is_contiguous())
    addresses = tuple([0 if t is None else t.data_ptr() for t in tensors])
    (run or _run)(_native.extension(), backward, shape, addresses, eps, act == "silu", h)


def fused_forward(h, u, table, gn_weight, gn_bias, groups, eps, act, run=None):
    """The fused forward: the C++ kernel (CPU tensors), or the kernel `run` launches (`fused_forward_cuda`)."""
    if h.numel() == 0:   # nothing to compute; the reference gives the empty results their exact form
        return _reference_forward(h, u, table, gn_weight, gn_bias, groups, eps, act)
    h, u, table, weight, bias = _prepare(h, u, table, gn_weight, gn_bias)
    out, mean = torch.empty_like(h), h.new_empty(h.shape[0], groups, dtype=weight.dtype)
    rstd = torch.empty_like(mean)
    _launch(False, groups, (h, u, table, weight, bias, out, mean, rstd, None, None, None, None, None), float(eps),
            act, run)
    return out, mean, rstd


def fused_backward(grad_out, h, u, table, gn_weight, gn_bias, mean, rstd, groups, act, run=None):
    """The fused backward, from the statistics the forward saved (devices as fused_forward)."""
    if h.numel() == 0:
        return _reference_backward(grad_out, h, u, table, gn_weight, gn_bias, mean, rstd, groups, act)
    h, u, table_c, weight, bias = _prepare(h, u, table, gn_weight, gn_bias)
    if grad_out.dtype != h.dtype or grad_out.stride() != h.stride():
        grad_out = grad_out.to(h.dtype).contiguous(memory_format=memory_format(h))
    grad_h, grad_table = torch.empty_like(h), None if table is None else torch.zeros_like(table_c)
    grad_weight, grad_bias = torch.empty_like(weight), torch.empty_like(bias)
    # weight is in the compute dtype (_prepare)
    _launch(True, groups, (h, u, table_c, weight, bias, None, _in(mean, weight.dtype), _in(rstd, weight.dtype),
                           grad_out, grad_h, grad_table, grad_weight, grad_bias), 0.0, act, run)
    return (grad_h, None if table is None else _as(grad_table, table.dtype), _as(grad_weight, gn_weight.dtype),
            _as(grad_bias, gn_bias.dtype))


def fused_silu_forward(h, gn_weight, gn_bias, groups, eps, run=None):
    """groupnorm_silu on groupnorm_film's kernels without the FiLM (devices as fused_forward)."""
    if h.numel() == 0:
        return _reference_silu_forward(h, gn_weight, gn_bias, groups, eps)
    return fused_forward(h, None, None, gn_weight, gn_bias, groups, eps, "silu", run)


def fused_silu_backward(grad_out, h, gn_weight, gn_bias, mean, rstd, groups, run=None):
    if h.numel() == 0:
        return _reference_silu_backward(grad_out, h, gn_weight, gn_bias, mean, rstd, groups)
    grad_h, _, grad_weight, grad_bias = fused_backward(grad_out, h, None, None, gn_weight, gn_bias, mean, rstd,
                                                       groups, "silu", run)
    return grad_h, grad_weight, grad_bias


def fused_forward_cuda(h, u, table, gn_weight, gn_bias, groups, eps, act):
    """fused_forward on CUDA tensors (the kernel registered for the CUDA dispatch key)."""
    return fused_forward(h, u, table, gn_weight, gn_bias, groups, eps, act, _run_cuda)


def fused_backward_cuda(grad_out, h, u, table, gn_weight, gn_bias, mean, rstd, groups, act):
    """fused_backward on CUDA tensors."""
    return fused_backward(grad_out, h, u, table, gn_weight, gn_bias, mean, rstd, groups, act, _run_cuda)


def fused_silu_forward_cuda(h, gn_weight, gn_bias, groups, eps):
    """fused_silu_forward on CUDA tensors."""
    return fused_silu_forward(h, gn_weight, gn_bias, groups, eps, _run_cuda)


def fused_silu_backward_cuda(grad_out, h, gn_weight, gn_bias, mean, rstd, groups):
    """fused_silu_backward on CUDA tensors."""
    return fused_silu_backward(grad_out, h, gn_weight, gn_bias, mean, rstd, groups, _run_cuda)
