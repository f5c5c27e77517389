"""The reverse step (DESIGN.md §1.5): svnr::reverse_step.

Kernels: kernels/reverse_step.py (Triton, CUDA tensors), csrc/reverse_step_cpu.cpp (C++, CPU tensors; glue at
the end of this file). Reference: svnr_fast.reference._reverse_step.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from . import _checks, _native, backends
from .lookup import lookup_table


def _fake(x, eps_hat, tau, delta, table, eta, z, clamp_min, clamp_max, seed, offset, return_x0_hat):
    image = lambda: torch.empty(x.shape, dtype=x.dtype, device=x.device)  # noqa: E731
    x0_hat = image() if return_x0_hat else x.new_empty(0)
    return image(), torch.empty(tau.shape, dtype=tau.dtype, device=tau.device), x0_hat


def _reference(*args):
    # the fake kernel declares contiguous results; the reference keeps its input's layout
    return tuple(t.contiguous() for t in reference._reverse_step(*args))


backends.define(
    "reverse_step",
    "(Tensor x, Tensor eps_hat, Tensor tau, Tensor delta, Tensor table, float eta, Tensor? z, float? clamp_min, "
    "float? clamp_max, SymInt seed, SymInt offset, bool return_x0_hat) -> (Tensor, Tensor, Tensor)",
    fake=_fake, reference=_reference, triton="svnr_fast.kernels.reverse_step:reverse_step",
    cpp="svnr_fast.ops.reverse_step:fused")


def reverse_step(x: Tensor, eps_hat: Tensor, tau: Tensor, delta, table: Tensor, *, eta: float = 1.0,
                 z: Optional[Tensor] = None, clamp=None, seed: int = 0, offset: int = 0,
                 return_x0_hat: bool = False):
    """One reverse step (DESIGN.md §1.5): see svnr_fast.reference.reverse_step. tau is a (B, 1, H, W) time
    map shared by the channels or a (B, C, H, W) one per channel; the next time map has its shape."""
    args = _checks.reverse_step_args(x, eps_hat, tau, delta, table, eta, z, clamp, seed, offset)
    low, high = args.clamp if args.clamp is not None else (None, None)
    x_new, tau_new, x0_hat = torch.ops.svnr.reverse_step(
        x, eps_hat, tau, args.delta, lookup_table(args.table, x.dtype), args.eta, z, low, high, seed, offset,
        bool(return_x0_hat))
    return (x_new, tau_new, x0_hat) if return_x0_hat else (x_new, tau_new)


# ---------------------------------------------------------------------------------------------------
# Glue of the C++ kernel
# ---------------------------------------------------------------------------------------------------

def fused(x, eps_hat, tau, delta, table, eta, z, clamp_min, clamp_max, seed, offset, return_x0_hat):
    """reverse_step on checked arguments with the raw signature of reference._reverse_step: inputs in any
    layout (read in place where their (H, W) planes are linear), results contiguous as the fake kernel says."""
    x_new, tau_new, x0_hat = _fake(x, eps_hat, tau, delta, table, eta, z, clamp_min, clamp_max, seed, offset,
                                   return_x0_hat)
    if x.numel() == 0:
        return x_new, tau_new, x0_hat
    dtype = _checks.compute_dtype(x.dtype)
    views = [_native.view(t) for t in (x, eps_hat, tau)]
    z_view = _native.view(z) if z is not None else (_native.NO_VIEW, None)
    delta = delta.to(dtype).contiguous()
    table_arg, table = _native.table_arg(table.to(dtype))
    B, C, H, W = x.shape
    _native.extension().reverse_step_cpu(
        (B, C, H * W), (views[0][0], views[1][0], z_view[0], views[2][0]), tau.shape[1] != 1,
        (delta.data_ptr(), x_new.data_ptr(), tau_new.data_ptr(), x0_hat.data_ptr() if return_x0_hat else 0),
        table_arg, float(eta), None if clamp_min is None else (float(clamp_min), float(clamp_max)), seed, offset,
        _native.threads())
    return x_new, tau_new, x0_hat
