"""The training sample (DESIGN.md §1.4): svnr::training_sample, and svnr::bridge_sample (its steps 2-5 from a
given condition y' and time map tau*, as training with observed time maps builds them).

Kernels: kernels/training_sample.py (Triton, CUDA tensors), csrc/training_sample_cpu.cpp (C++, CPU tensors;
glue at the end of this file). Reference: svnr_fast.reference._training_sample, bridge_sample.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..reference import TrainingSample
from . import _checks, _native, backends
from .lookup import lookup_table


def _fake(x0, sigma_r, sigma_s, u, table, correlated, eps_T, eps_prime, seed, offset, per_channel, batch_t0, min_std):
    B, C, H, W = x0.shape
    image = lambda: torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)  # noqa: E731
    tau = x0.new_empty((B, C if per_channel else 1, H, W), dtype=_checks.compute_dtype(x0.dtype))
    return image(), image(), tau, image()


def _reference(*args):
    # the fake kernel declares contiguous results; the reference keeps its input's layout
    return tuple(t.contiguous() for t in reference._training_sample(*args))


backends.define(
    "training_sample",
    "(Tensor x0, Tensor sigma_r, Tensor sigma_s, Tensor u, Tensor table, bool correlated, Tensor? eps_T, "
    "Tensor? eps_prime, SymInt seed, SymInt offset, bool per_channel, bool batch_t0, float min_std) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    fake=_fake, reference=_reference, triton="svnr_fast.kernels.training_sample:training_sample",
    cpp="svnr_fast.ops.training_sample:fused")


def _bridge_fake(x0, y, tau_star, u, table, correlated, eps_prime):
    image = lambda: torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)  # noqa: E731
    return image(), torch.empty(tau_star.shape, dtype=tau_star.dtype, device=tau_star.device), image()


def _bridge_reference(x0, y, tau_star, u, table, correlated, eps_prime):
    dtype = _checks.compute_dtype(x0.dtype)
    x_t, tau, target = reference.bridge_sample(x0.to(dtype), y.to(dtype), tau_star.to(dtype),
                                               u.to(dtype).view(-1, 1, 1, 1), table.to(dtype), correlated,
                                               eps_prime.to(dtype))
    return x_t.to(x0.dtype).contiguous(), tau.contiguous(), target.to(x0.dtype).contiguous()


backends.define(
    "bridge_sample",
    "(Tensor x0, Tensor y, Tensor tau_star, Tensor u, Tensor table, bool correlated, Tensor eps_prime) "
    "-> (Tensor, Tensor, Tensor)",
    fake=_bridge_fake, reference=_bridge_reference)


def training_sample(x0: Tensor, sigma_r, sigma_s, u, table: Tensor, *, correlated: bool = True,
                    eps_T: Optional[Tensor] = None, eps_prime: Optional[Tensor] = None,
                    seed: int = 0, offset: int = 0, per_channel: bool = False, t0_per: str = "image",
                    min_std: float = 0.0) -> TrainingSample:
    """One SVNR training sample (DESIGN.md §1.4): see svnr_fast.reference.training_sample."""
    args = _checks.training_sample_args(x0, sigma_r, sigma_s, u, table, eps_T, eps_prime, seed, offset, t0_per,
                                        min_std)
    return TrainingSample(*torch.ops.svnr.training_sample(
        x0, args.sigma_r, args.sigma_s, args.u, lookup_table(args.table, x0.dtype), bool(correlated), eps_T,
        eps_prime, seed, offset, bool(per_channel), t0_per == "batch", args.min_std))


# ---------------------------------------------------------------------------------------------------
# Glue of the C++ kernel
# ---------------------------------------------------------------------------------------------------

def fused(x0, sigma_r, sigma_s, u, table, correlated, eps_T, eps_prime, seed, offset, per_channel, batch_t0,
          min_std):
    """training_sample on checked arguments with the raw signature of reference._training_sample: inputs in
    any layout (read in place where their (H, W) planes are linear), results contiguous as the fake kernel
    says."""
    y, x_t, tau, target = _fake(x0, sigma_r, sigma_s, u, table, correlated, eps_T, eps_prime, seed, offset,
                                per_channel, batch_t0, min_std)
    if x0.numel() == 0:
        return y, x_t, tau, target
    dtype = tau.dtype
    views = [_native.view(t) if t is not None else (_native.NO_VIEW, None) for t in (x0, eps_T, eps_prime)]
    per_image = [p.to(dtype).contiguous() for p in (sigma_r, sigma_s, u)]
    table_arg, table = _native.table_arg(table.to(dtype))
    B, C, H, W = x0.shape
    _native.extension().training_sample_cpu(
        (B, C, H * W), tuple(v for v, _ in views),
        (*(p.data_ptr() for p in per_image), y.data_ptr(), x_t.data_ptr(), tau.data_ptr(), target.data_ptr()),
        table_arg, bool(correlated), bool(per_channel), bool(batch_t0), float(min_std), seed, offset,
        _native.threads())
    return y, x_t, tau, target
