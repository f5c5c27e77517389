"""Python glue of the fused groupnorm_film kernels (csrc/groupnorm_film_cpu.cpp, csrc/groupnorm_film_cuda.cu).

The functions here have the raw signatures of `svnr_fast.reference._groupnorm_film` and
`_groupnorm_film_backward` (checked arguments) and are what svnr_fast.backends dispatches to. They allocate
every output with torch and hand raw pointers, sizes, the thread count (CPU) or the current stream (CUDA)
to svnr_fast._C.

Layouts: h in NCHW or channels_last (NHWC) memory is read in place and the results come out in the same
layout. Any other strides cost one copy of h into NCHW (and of grad_out into h's layout in the backward).
u, the table, weight and bias are converted to the compute dtype (float64 for float64 data, else float32):
u is 1/C of h, the others are tiny. For NCHW the table is passed transposed, (2C, K), so that each
channel's column is contiguous.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from svnr_fast import _checks, backends, reference

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def memory_format(h: Tensor) -> torch.memory_format:
    """The layout the kernels read h in and write their image results in: NHWC when h is channels_last
    (and not also NCHW-contiguous), else NCHW."""
    if not h.is_contiguous() and h.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


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


def groupnorm_film(h, u, table, gn_weight, gn_bias, groups, eps, act):
    """The fused forward on h's device (the C++ kernel for CPU tensors, the CUDA kernel for CUDA ones)."""
    if h.numel() == 0:   # nothing to compute; the reference gives the empty results their exact form
        return reference._groupnorm_film(h, u, table, gn_weight, gn_bias, groups, eps, act)
    ext = _extension()
    p = _prepare(h, u, table, gn_weight, gn_bias, groups)
    out, mean, rstd = torch.empty_like(p.h), _statistics(p.h, groups), _statistics(p.h, groups)
    kind, tail, _alive = _launch_tail(ext, p)
    getattr(ext, f"groupnorm_film_forward_{kind}")(
        *p.shape, p.h.data_ptr(), p.u.data_ptr(), p.table.data_ptr(), p.weight.data_ptr(), p.bias.data_ptr(),
        out.data_ptr(), mean.data_ptr(), rstd.data_ptr(), float(eps), act == "silu", *tail)
    return out, mean, rstd


def groupnorm_film_backward(grad_out, h, u, table, gn_weight, gn_bias, mean, rstd, groups, act):
    """The fused backward on h's device, from the statistics the forward saved."""
    if h.numel() == 0:
        return reference._groupnorm_film_backward(grad_out, h, u, table, gn_weight, gn_bias, mean, rstd, groups,
                                                  act)
    ext = _extension()
    p = _prepare(h, u, table, gn_weight, gn_bias, groups)
    grad_out, mean, rstd, grad_h, grad_table, grad_weight, grad_bias = _backward_outputs(p, grad_out, mean, rstd)
    kind, tail, _alive = _launch_tail(ext, p)
    getattr(ext, f"groupnorm_film_backward_{kind}")(
        *p.shape, grad_out.data_ptr(), p.h.data_ptr(), p.u.data_ptr(), p.table.data_ptr(), p.weight.data_ptr(),
        p.bias.data_ptr(), mean.data_ptr(), rstd.data_ptr(), grad_h.data_ptr(), grad_table.data_ptr(),
        grad_weight.data_ptr(), grad_bias.data_ptr(), act == "silu", *tail)
    return _cast_grads(grad_h, grad_table, grad_weight, grad_bias, table, gn_weight, gn_bias)
