"""What the glue of the C++ and CUDA kernels (svnr_fast._C) shares: the extension, dtype codes and tensor views.

The extension takes tensors as addresses with their sizes (it links no libtorch, csrc/svnr_kernels.h); the
glue allocates every output with torch, passes the thread count torch uses and keeps every tensor it passes
alive until the call returns.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import backends

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
NO_VIEW = (0, 0, 0, 0, 0)   # a tensor that is not given (e.g. noise drawn in the kernel)


def extension():
    """svnr_fast._C, or a clear error when it was not built."""
    ext, error = backends.extension()
    if ext is None:
        raise backends.BackendUnavailable(f"the C++/CUDA extension svnr_fast._C is not built ({error}); "
                                          f"reinstall svnr_fast with a C++ compiler, or use "
                                          f"SVNR_FAST_BACKEND=reference")
    return ext


def view(t: Tensor) -> tuple[tuple, Tensor]:
    """A (B, C, H, W) tensor as the kernels' (B, C, H*W) view: ((address, dtype code, stride_b, stride_c,
    stride_pixel), the tensor viewed). Read in place when pixel h * W + w sits at a fixed stride (NCHW, NHWC,
    their slices and broadcasts), else from a contiguous copy, which the caller keeps alive with the view."""
    _, _, H, W = t.shape
    stride_b, stride_c, stride_h, stride_w = t.stride()
    if W == 1:
        stride_p = stride_h
    elif H == 1 or stride_h == W * stride_w:
        stride_p = stride_w
    else:
        t = t.contiguous()
        return view(t)
    return (t.data_ptr(), DTYPE_CODES[t.dtype], stride_b, stride_c, stride_p), t


def flat_view(t: Tensor) -> tuple[tuple, Tensor]:
    """Any tensor as a (1, 1, n) view (a contiguous copy when it cannot be flattened in place)."""
    flat = t.reshape(-1)
    return (flat.data_ptr(), DTYPE_CODES[flat.dtype], 0, 0, flat.stride(0)), flat


def table_arg(table: Tensor) -> tuple[tuple[int, int], Tensor]:
    """((address, T), the table) of a variance table of T + 1 entries, contiguous."""
    table = table.contiguous()
    return (table.data_ptr(), table.numel() - 1), table


def threads() -> int:
    return torch.get_num_threads()
