"""GroupNorm + spatial FiLM (+ SiLU) (DESIGN.md §1.6): svnr::groupnorm_film and svnr::groupnorm_film_backward.

Kernels: csrc/groupnorm_film_cpu.cpp (C++, CPU tensors) and csrc/groupnorm_film_cuda.cu (CUDA), reached
through the glue at the end of this file. Reference: svnr_fast.reference._groupnorm_film /
_groupnorm_film_backward.

The glue allocates every output with torch and hands the shape, the tensors' addresses and the thread count
(CPU) or the current stream (CUDA) to svnr_fast._C, which builds one GroupNormFilmArgs from them
(csrc/svnr_kernels.h). Layouts: h in NCHW or channels_last (NHWC) memory is read in place and the results come
out in the same layout. Any other strides cost one copy of h into NCHW (and of grad_out into h's layout in the
backward). u, the table, weight and bias are converted to the compute dtype (float64 for float64 data, else
float32): u is 1/C of h, the others are tiny; the kernels take the (K, 2C) table as it is.
"""
from __future__ import annotations

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

def _prepare(h: Tensor, u: Tensor, table: Tensor, gn_weight: Tensor, gn_bias: Tensor):
    """h in the layout the kernels read; u (B, H*W), table, weight and bias contiguous in the compute dtype."""
    h = h.contiguous(memory_format=memory_format(h))
    dtype = _checks.compute_dtype(h.dtype)
    B, _, H, W = h.shape
    return (h, u.to(dtype).reshape(B, H * W).contiguous(), table.to(dtype).contiguous(),
            gn_weight.to(dtype).contiguous(), gn_bias.to(dtype).contiguous())


def _run(ext, backward: bool, shape: tuple, addresses: tuple, eps: float, silu: bool, h: Tensor) -> None:
    """The kernel of h's device. CUDA: on torch's current stream, with a workspace; temporaries freed after
    the launch (the workspace, converted inputs) are safe, since the caching allocator hands their memory
    only to work queued later on the same stream."""
    if not h.is_cuda:
        ext.groupnorm_film_cpu(backward, shape, addresses, eps, silu, _native.threads())
        return
    workspace = torch.empty(ext.groupnorm_film_cuda_workspace_bytes(shape), dtype=torch.uint8, device=h.device)
    ext.groupnorm_film_cuda(backward, shape, addresses, eps, silu, workspace.data_ptr(), h.device.index,
                            torch.cuda.current_stream(h.device).cuda_stream)


def _launch(backward: bool, groups: int, tensors: tuple, eps: float, act: str) -> None:
    """Runs one pass on `tensors` = (h, u, table, weight, bias, out, mean, rstd, grad_out, grad_h, grad_table,
    grad_weight, grad_bias), None where the pass has none (the order of the extension's `tensors`)."""
    h, table = tensors[0], tensors[2]
    B, C, H, W = h.shape
    shape = (_native.DTYPE_CODES[h.dtype], B, C, H * W, groups, table.shape[0], memory_format(h) == torch.channels_last)
    addresses = tuple(0 if t is None else t.data_ptr() for t in tensors)
    _run(_native.extension(), backward, shape, addresses, float(eps), act == "silu", h)


def _statistics(h: Tensor, groups: int) -> Tensor:
    return h.new_empty((h.shape[0], groups), dtype=_checks.compute_dtype(h.dtype))


def fused_forward(h, u, table, gn_weight, gn_bias, groups, eps, act):
    """The fused forward on h's device (the C++ kernel for CPU tensors, the CUDA kernel for CUDA ones)."""
    if h.numel() == 0:   # nothing to compute; the reference gives the empty results their exact form
        return _reference_forward(h, u, table, gn_weight, gn_bias, groups, eps, act)
    h, u, table, weight, bias = _prepare(h, u, table, gn_weight, gn_bias)
    out, mean, rstd = torch.empty_like(h), _statistics(h, groups), _statistics(h, groups)
    _launch(False, groups, (h, u, table, weight, bias, out, mean, rstd) + (None,) * 5, eps, act)
    return out, mean, rstd


def fused_backward(grad_out, h, u, table, gn_weight, gn_bias, mean, rstd, groups, act):
    """The fused backward on h's device, from the statistics the forward saved."""
    if h.numel() == 0:
        return _reference_backward(grad_out, h, u, table, gn_weight, gn_bias, mean, rstd, groups, act)
    dtype = _checks.compute_dtype(h.dtype)
    h, u, table_c, weight, bias = _prepare(h, u, table, gn_weight, gn_bias)
    C = h.shape[1]
    grad_out = grad_out.to(h.dtype).contiguous(memory_format=memory_format(h))
    grad_h, grad_table = torch.empty_like(h), h.new_zeros(table_c.shape, dtype=dtype)
    grad_weight, grad_bias = h.new_empty(C, dtype=dtype), h.new_empty(C, dtype=dtype)
    statistics = (mean.to(dtype).contiguous(), rstd.to(dtype).contiguous())
    _launch(True, groups, (h, u, table_c, weight, bias, None, *statistics, grad_out, grad_h, grad_table, grad_weight,
                           grad_bias), 0.0, act)
    return grad_h, grad_table.to(table.dtype), grad_weight.to(gn_weight.dtype), grad_bias.to(gn_bias.dtype)
