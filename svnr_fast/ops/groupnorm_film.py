"""GroupNorm + spatial FiLM (+ SiLU) (DESIGN.md §1.6): svnr::groupnorm_film and svnr::groupnorm_film_backward.

Kernels: csrc/groupnorm_film_cpu.cpp (C++, CPU tensors) and csrc/groupnorm_film_cuda.cu (CUDA), reached
through the glue at the end of this file. Reference: svnr_fast.reference._groupnorm_film /
_groupnorm_film_backward.

The glue allocates every output with torch and hands raw pointers, sizes, the thread count (CPU) or the
current stream (CUDA) to svnr_fast._C. Layouts: h in NCHW or channels_last (NHWC) memory is read in place
and the results come out in the same layout. Any other strides cost one copy of h into NCHW (and of grad_out
into h's layout in the backward). u, the table, weight and bias are converted to the compute dtype (float64
for float64 data, else float32): u is 1/C of h, the others are tiny. For NCHW the table is passed
transposed, (2C, K), so that each channel's column is contiguous.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import reference
from . import _checks, backends


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
    cuda="svnr_fast.ops.groupnorm_film:fused_forward")
backends.define(
    "groupnorm_film_backward",
    "(Tensor grad_out, Tensor h, Tensor u, Tensor table, Tensor gn_weight, Tensor gn_bias, Tensor mean, "
    "Tensor rstd, int groups, str act) -> (Tensor, Tensor, Tensor, Tensor)",
    fake=lambda grad_out, h, u, table, gn_weight, gn_bias, mean, rstd, groups, act: (
        _image_like(h), torch.empty_like(table), torch.empty_like(gn_weight), torch.empty_like(gn_bias)),
    reference=_reference_backward, cpp="svnr_fast.ops.groupnorm_film:fused_backward",
    cuda="svnr_fast.ops.groupnorm_film:fused_backward")


def _setup_context(ctx, inputs, output):
    h, u, table, gn_weight, gn_bias, groups, eps, act = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(h, u, table, gn_weight, gn_bias, mean, rstd)
    ctx.groups, ctx.act = groups, act


def _backward(ctx, grad_out, grad_mean, grad_rstd):
    # mean and rstd are saved statistics, not results: they carry no gradient
    h, u, table, gn_weight, gn_bias, mean, rstd = ctx.saved_tensors
    grad_h, grad_table, grad_weight, grad_bias = torch.ops.svnr.groupnorm_film_backward(
        grad_out, h, u, table, gn_weight, gn_bias, mean, rstd, ctx.groups, ctx.act)
    return grad_h, None, grad_table, grad_weight, grad_bias, None, None, None


backends.register_autograd("groupnorm_film", _backward, _setup_context)


def groupnorm_film(h: Tensor, u: Tensor, table: Tensor, gn_weight: Tensor, gn_bias: Tensor, groups: int,
                   eps: float = 1e-5, act: str = "silu") -> Tensor:
    """act((GroupNorm(h) * gn_weight + gn_bias) * (1 + scale(u)) + shift(u)) (DESIGN.md §1.6).

    Gradients flow to h, table, gn_weight and gn_bias (not u).
    """
    _checks.groupnorm_film_args(h, u, table, gn_weight, gn_bias, groups, eps, act)
    return torch.ops.svnr.groupnorm_film(h, u, table, gn_weight, gn_bias, groups, float(eps), act)[0]


# ---------------------------------------------------------------------------------------------------
# Glue of the C++ and CUDA kernels
# ---------------------------------------------------------------------------------------------------

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


class _Prepared(NamedTuple):
    shape: tuple            # (dtype code, B, C, H*W, groups, K, channels_last): the kernels' shape arguments
    h: Tensor
    u: Tensor
    table: Tensor
    weight: Tensor
    bias: Tensor


def _extension():
    ext, error = backends.extension()
    if ext is None:
        raise backends.BackendUnavailable(f"the C++/CUDA extension svnr_fast._C is not built ({error}); "
                                          f"reinstall svnr_fast with a C++ compiler, or use "
                                          f"SVNR_FAST_BACKEND=reference")
    return ext


def _prepare(h: Tensor, u: Tensor, table: Tensor, gn_weight: Tensor, gn_bias: Tensor, groups: int) -> _Prepared:
    layout = memory_format(h)
    h = h.contiguous(memory_format=layout)
    dtype = _checks.compute_dtype(h.dtype)
    B, C, H, W = h.shape
    channels_last = layout == torch.channels_last
    table = table.to(dtype)
    return _Prepared(
        shape=(_DTYPE_CODES[h.dtype], B, C, H * W, groups, table.shape[0], channels_last),
        h=h,
        u=u.to(dtype).reshape(B, H * W).contiguous(),
        table=table.contiguous() if channels_last else table.t().contiguous(),
        weight=gn_weight.to(dtype).contiguous(),
        bias=gn_bias.to(dtype).contiguous())


def _statistics(h: Tensor, groups: int) -> Tensor:
    return h.new_empty((h.shape[0], groups), dtype=_checks.compute_dtype(h.dtype))


def _backward_outputs(p: _Prepared, grad_out: Tensor, mean: Tensor, rstd: Tensor):
    dtype = _checks.compute_dtype(p.h.dtype)
    K, C = p.shape[5], p.shape[2]
    return (grad_out.to(p.h.dtype).contiguous(memory_format=memory_format(p.h)),
            mean.to(dtype).contiguous(), rstd.to(dtype).contiguous(),
            torch.empty_like(p.h), p.h.new_zeros((K, 2 * C), dtype=dtype),
            p.h.new_empty(C, dtype=dtype), p.h.new_empty(C, dtype=dtype))


def _cast_grads(grad_h, grad_table, grad_weight, grad_bias, table, gn_weight, gn_bias):
    return grad_h, grad_table.to(table.dtype), grad_weight.to(gn_weight.dtype), grad_bias.to(gn_bias.dtype)


def _launch_tail(ext, p: _Prepared) -> tuple[str, tuple, object]:
    """(kernel suffix, the arguments after the common ones, what must stay alive during the launch).

    CPU: the thread count torch uses. CUDA: a workspace, the device index and torch's current stream;
    temporaries freed after the launch (the workspace, converted inputs) are safe, since the caching
    allocator hands their memory only to work queued later on the same stream.
    """
    if not p.h.is_cuda:
        return "cpu", (torch.get_num_threads(),), None
    workspace = torch.empty(ext.groupnorm_film_cuda_workspace_bytes(*p.shape), dtype=torch.uint8,
                            device=p.h.device)
    stream = torch.cuda.current_stream(p.h.device).cuda_stream
    return "cuda", (workspace.data_ptr(), p.h.device.index, stream), workspace


def fused_forward(h, u, table, gn_weight, gn_bias, groups, eps, act):
    """The fused forward on h's device (the C++ kernel for CPU tensors, the CUDA kernel for CUDA ones)."""
    if h.numel() == 0:   # nothing to compute; the reference gives the empty results their exact form
        return _reference_forward(h, u, table, gn_weight, gn_bias, groups, eps, act)
    ext = _extension()
    p = _prepare(h, u, table, gn_weight, gn_bias, groups)
    out, mean, rstd = torch.empty_like(p.h), _statistics(p.h, groups), _statistics(p.h, groups)
    kind, tail, _alive = _launch_tail(ext, p)
    getattr(ext, f"groupnorm_film_forward_{kind}")(
        *p.shape, p.h.data_ptr(), p.u.data_ptr(), p.table.data_ptr(), p.weight.data_ptr(), p.bias.data_ptr(),
        out.data_ptr(), mean.data_ptr(), rstd.data_ptr(), float(eps), act == "silu", *tail)
    return out, mean, rstd


def fused_backward(grad_out, h, u, table, gn_weight, gn_bias, mean, rstd, groups, act):
    """The fused backward on h's device, from the statistics the forward saved."""
    if h.numel() == 0:
        return _reference_backward(grad_out, h, u, table, gn_weight, gn_bias, mean, rstd, groups, act)
    ext = _extension()
    p = _prepare(h, u, table, gn_weight, gn_bias, groups)
    grad_out, mean, rstd, grad_h, grad_table, grad_weight, grad_bias = _backward_outputs(p, grad_out, mean, rstd)
    kind, tail, _alive = _launch_tail(ext, p)
    getattr(ext, f"groupnorm_film_backward_{kind}")(
        *p.shape, grad_out.data_ptr(), p.h.data_ptr(), p.u.data_ptr(), p.table.data_ptr(), p.weight.data_ptr(),
        p.bias.data_ptr(), mean.data_ptr(), rstd.data_ptr(), grad_h.data_ptr(), grad_table.data_ptr(),
        grad_weight.data_ptr(), grad_bias.data_ptr(), act == "silu", *tail)
    return _cast_grads(grad_h, grad_table, grad_weight, grad_bias, table, gn_weight, gn_bias)
