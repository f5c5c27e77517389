"""The fast SVNR ops: `svnr::` torch.library ops with fake kernels, dispatched by device.

The functions here have the signatures and results of `svnr_fast.reference`. Each checks its arguments
(svnr_fast._checks), then calls the registered op `torch.ops.svnr.<op>`, whose implementation picks a
backend at call time (svnr_fast.backends). Loops that must not synchronise with the GPU (the sampler,
the training step) validate once and then call `torch.ops.svnr.*` directly.

The ops are `torch.library.custom_op`s rather than `triton_op`s: on machines without a GPU driver
`triton_op` breaks opcheck and torch.compile (DESIGN.md §3). Fake kernels make torch.compile and
`torch.library.opcheck` work everywhere.
"""
from typing import Optional

import torch
from torch import Tensor

from . import _checks, backends
from .reference import TrainingSample


def _impl(op: str, device: torch.device):
    return backends.implementation(op, device)


def _time_like(x: Tensor, shape=None) -> Tensor:
    return x.new_empty(x.shape if shape is None else shape, dtype=_checks.compute_dtype(x.dtype))


def _image_like(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _contiguous(result):
    """The layout the fake kernels below declare: contiguous. The Triton kernels write it; the eager
    reference keeps its inputs' layout (channels_last, transposed), which torch.compile must not see."""
    if isinstance(result, Tensor):
        return result.contiguous()
    return tuple(t.contiguous() for t in result)


# ---------------------------------------------------------------------------------------------------
# Schedule lookups
# ---------------------------------------------------------------------------------------------------

@torch.library.custom_op("svnr::gamma", mutates_args=())
def _gamma(tau: Tensor, table: Tensor) -> Tensor:
    return _contiguous(_impl("gamma", tau.device)(tau.to(_checks.compute_dtype(tau.dtype)), table))


@_gamma.register_fake
def _(tau, table):
    return _time_like(tau)


@torch.library.custom_op("svnr::time_from_variance", mutates_args=())
def _time_from_variance(v: Tensor, table: Tensor) -> Tensor:
    return _contiguous(_impl("time_from_variance", v.device)(v.to(_checks.compute_dtype(v.dtype)), table))


@_time_from_variance.register_fake
def _(v, table):
    return _time_like(v)


@torch.library.custom_op("svnr::time_map", mutates_args=())
def _time_map(variance: Tensor, table: Tensor) -> Tensor:
    return _contiguous(_impl("time_map", variance.device)(variance.to(_checks.compute_dtype(variance.dtype)), table))


@_time_map.register_fake
def _(variance, table):
    B, _, H, W = variance.shape
    return _time_like(variance, (B, 1, H, W))


def _lookup_table(table: Tensor, dtype: torch.dtype) -> Tensor:
    return table.to(_checks.compute_dtype(dtype))


@_checks.one_read()
def _checked_lookup(name: str, value: Tensor, table: Tensor, ndim: Optional[int] = None) -> Tensor:
    """Checks a lookup's input and table; returns the table in the input's compute dtype."""
    _checks.tensor(name, value, ndim=ndim)
    _checks.table(table, value.device)
    _checks.finite(name, value)
    return _lookup_table(table, value.dtype)


def gamma(tau: Tensor, table: Tensor) -> Tensor:
    """gamma(tau): piecewise-linear interpolation of the variance table (any shape)."""
    return torch.ops.svnr.gamma(tau, _checked_lookup("tau", tau, table))


def time_from_variance(v: Tensor, table: Tensor) -> Tensor:
    """tau(v): the exact inverse of gamma (0 below table[0], T above table[-1])."""
    return torch.ops.svnr.time_from_variance(v, _checked_lookup("v", v, table))


def time_map(variance: Tensor, table: Tensor) -> Tensor:
    """tau*(B, 1, H, W) = tau(max over channels of the variance map)."""
    return torch.ops.svnr.time_map(variance, _checked_lookup("variance", variance, table, ndim=4))


# ---------------------------------------------------------------------------------------------------
# Training sample
# ---------------------------------------------------------------------------------------------------

@torch.library.custom_op("svnr::training_sample", mutates_args=())
def _training_sample(x0: Tensor, sigma_r: Tensor, sigma_s: Tensor, u: Tensor, table: Tensor, correlated: bool,
                     eps_T: Optional[Tensor], eps_prime: Optional[Tensor], seed: int, offset: int, per_channel: bool,
                     batch_t0: bool, min_std: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _contiguous(_impl("training_sample", x0.device)(x0, sigma_r, sigma_s, u, table, correlated, eps_T,
                                                           eps_prime, seed, offset, per_channel, batch_t0, min_std))


@_training_sample.register_fake
def _(x0, sigma_r, sigma_s, u, table, correlated, eps_T, eps_prime, seed, offset, per_channel, batch_t0, min_std):
    B, C, H, W = x0.shape
    return _image_like(x0), _image_like(x0), _time_like(x0, (B, C if per_channel else 1, H, W)), _image_like(x0)


def training_sample(x0: Tensor, sigma_r, sigma_s, u, table: Tensor, *, correlated: bool = True,
                    eps_T: Optional[Tensor] = None, eps_prime: Optional[Tensor] = None,
                    seed: int = 0, offset: int = 0, per_channel: bool = False, t0_per: str = "image",
                    min_std: float = 0.0) -> TrainingSample:
    """One SVNR training sample (DESIGN.md §1.4): see svnr_fast.reference.training_sample."""
    args = _checks.training_sample_args(x0, sigma_r, sigma_s, u, table, eps_T, eps_prime, seed, offset, t0_per,
                                        min_std)
    return TrainingSample(*torch.ops.svnr.training_sample(
        x0, args.sigma_r, args.sigma_s, args.u, _lookup_table(args.table, x0.dtype), bool(correlated), eps_T,
        eps_prime, seed, offset, bool(per_channel), t0_per == "batch", args.min_std))


# ---------------------------------------------------------------------------------------------------
# Reverse step
# ---------------------------------------------------------------------------------------------------

@torch.library.custom_op("svnr::reverse_step", mutates_args=())
def _reverse_step(x: Tensor, eps_hat: Tensor, tau: Tensor, delta: Tensor, table: Tensor, eta: float,
                  z: Optional[Tensor], clamp_min: Optional[float], clamp_max: Optional[float], seed: int,
                  offset: int, return_x0_hat: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _contiguous(_impl("reverse_step", x.device)(x, eps_hat, tau, delta, table, eta, z, clamp_min, clamp_max,
                                                       seed, offset, return_x0_hat))


@_reverse_step.register_fake
def _(x, eps_hat, tau, delta, table, eta, z, clamp_min, clamp_max, seed, offset, return_x0_hat):
    x0_hat = _image_like(x) if return_x0_hat else x.new_empty(0)
    return _image_like(x), torch.empty(tau.shape, dtype=tau.dtype, device=tau.device), x0_hat


def reverse_step(x: Tensor, eps_hat: Tensor, tau: Tensor, delta, table: Tensor, *, eta: float = 1.0,
                 z: Optional[Tensor] = None, clamp=None, seed: int = 0, offset: int = 0,
                 return_x0_hat: bool = False):
    """One reverse step (DESIGN.md §1.5): see svnr_fast.reference.reverse_step."""
    args = _checks.reverse_step_args(x, eps_hat, tau, delta, table, eta, z, clamp, seed, offset)
    low, high = args.clamp if args.clamp is not None else (None, None)
    x_new, tau_new, x0_hat = torch.ops.svnr.reverse_step(
        x, eps_hat, tau, args.delta, _lookup_table(args.table, x.dtype), args.eta, z, low, high, seed, offset,
        bool(return_x0_hat))
    return (x_new, tau_new, x0_hat) if return_x0_hat else (x_new, tau_new)


# ---------------------------------------------------------------------------------------------------
# GroupNorm + spatial FiLM (+ SiLU)
# ---------------------------------------------------------------------------------------------------

def _film_statistics_like(h: Tensor, groups: int) -> Tensor:
    return h.new_empty((h.shape[0], groups), dtype=_checks.compute_dtype(h.dtype))


def _film_image_like(h: Tensor) -> Tensor:
    """An output laid out like the fused kernels write it: NHWC for channels_last h, else NCHW."""
    from .kernels.groupnorm_film import memory_format
    return torch.empty(h.shape, dtype=h.dtype, device=h.device).contiguous(memory_format=memory_format(h))


def _film_layout(result: Tensor, h: Tensor) -> Tensor:
    # the fused kernels already produce this layout; the reference may not
    from .kernels.groupnorm_film import memory_format
    return result.contiguous(memory_format=memory_format(h))


@torch.library.custom_op("svnr::groupnorm_film", mutates_args=())
def _groupnorm_film(h: Tensor, u: Tensor, table: Tensor, gn_weight: Tensor, gn_bias: Tensor, groups: int,
                    eps: float, act: str) -> tuple[Tensor, Tensor, Tensor]:
    out, mean, rstd = _impl("groupnorm_film", h.device)(h, u, table, gn_weight, gn_bias, groups, eps, act)
    return _film_layout(out, h), mean, rstd


@_groupnorm_film.register_fake
def _(h, u, table, gn_weight, gn_bias, groups, eps, act):
    return _film_image_like(h), _film_statistics_like(h, groups), _film_statistics_like(h, groups)


@torch.library.custom_op("svnr::groupnorm_film_backward", mutates_args=())
def _groupnorm_film_backward(grad_out: Tensor, h: Tensor, u: Tensor, table: Tensor, gn_weight: Tensor,
                             gn_bias: Tensor, mean: Tensor, rstd: Tensor, groups: int,
                             act: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grad_h, grad_table, grad_weight, grad_bias = _impl("groupnorm_film_backward", h.device)(
        grad_out, h, u, table, gn_weight, gn_bias, mean, rstd, groups, act)
    return _film_layout(grad_h, h), grad_table, grad_weight, grad_bias


@_groupnorm_film_backward.register_fake
def _(grad_out, h, u, table, gn_weight, gn_bias, mean, rstd, groups, act):
    return _film_image_like(h), _image_like(table), _image_like(gn_weight), _image_like(gn_bias)


def _groupnorm_film_setup(ctx, inputs, output):
    h, u, table, gn_weight, gn_bias, groups, eps, act = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(h, u, table, gn_weight, gn_bias, mean, rstd)
    ctx.groups, ctx.act = groups, act


def _groupnorm_film_grad(ctx, grad_out, grad_mean, grad_rstd):
    # mean and rstd are saved statistics, not results: they carry no gradient
    h, u, table, gn_weight, gn_bias, mean, rstd = ctx.saved_tensors
    grad_h, grad_table, grad_weight, grad_bias = torch.ops.svnr.groupnorm_film_backward(
        grad_out, h, u, table, gn_weight, gn_bias, mean, rstd, ctx.groups, ctx.act)
    return grad_h, None, grad_table, grad_weight, grad_bias, None, None, None


_groupnorm_film.register_autograd(_groupnorm_film_grad, setup_context=_groupnorm_film_setup)


def groupnorm_film(h: Tensor, u: Tensor, table: Tensor, gn_weight: Tensor, gn_bias: Tensor, groups: int,
                   eps: float = 1e-5, act: str = "silu") -> Tensor:
    """act((GroupNorm(h) * gn_weight + gn_bias) * (1 + scale(u)) + shift(u)) (DESIGN.md §1.6).

    Gradients flow to h, table, gn_weight and gn_bias (not u).
    """
    _checks.groupnorm_film_args(h, u, table, gn_weight, gn_bias, groups, eps, act)
    return torch.ops.svnr.groupnorm_film(h, u, table, gn_weight, gn_bias, groups, float(eps), act)[0]
