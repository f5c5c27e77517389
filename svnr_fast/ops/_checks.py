"""Argument checks shared by the reference and the fast ops.

Every check names the argument and says how to fix it. Metadata checks (rank, dtype, device, shape)
cost nothing; value checks (NaN/inf, negative noise parameters, a table that is not strictly
increasing) read the data and therefore synchronise with a GPU, so they are skipped while
`torch.compile` traces, loops that call the raw `torch.ops.svnr.*` ops validate once, up front, and
the whole-op checks below gather an op's value checks into one reduction read once (`one_read`): one
host sync per call instead of one per check.

Each tensor is read once. NaN/inf in a float32/float64 tensor: its sum is finite only if every element is
(inf and NaN propagate through IEEE additions: inf + finite = inf, inf - inf = NaN, NaN + anything = NaN),
and a non-finite sum of finite elements (an overflow) is told apart by an exact test run only then. The
exact test is torch.aminmax (NaN propagates to both results, so all elements are finite exactly when the
minimum and the maximum are); half-precision tensors, whose sums overflow easily, and the per-image
parameters, whose bounds it also gives, take it directly. A table that passed its checks is remembered by
its memory and version (`_VALID_TABLES`) and not read again.
"""
from __future__ import annotations

import collections
import contextlib
import math
import threading
from numbers import Real
from typing import Callable, NamedTuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tracing() -> bool:
    return torch.compiler.is_compiling()


_gathering = threading.local()


@contextlib.contextmanager
def one_read():
    """Value checks of tensors inside are gathered and read together on exit: one host sync, the same
    errors (the first failing one, in order, raises its own message). Checks that read no device value
    (metadata, Python floats) still raise at once."""
    # while torch.compile traces, value checks are skipped: nothing to gather, and the thread-local state
    # is left out of the trace; nested: the outer block reads the checks
    if _tracing() or getattr(_gathering, "checks", None) is not None:
        yield
        return
    checks: list[tuple[torch.Tensor, Callable[[], str], Callable[[], torch.Tensor] | None]] = []
    passed: list[Callable[[], None]] = []
    _gathering.checks, _gathering.passed = checks, passed
    try:
        yield
    finally:
        _gathering.checks = _gathering.passed = None
    if checks and not bool(torch.stack([ok for ok, _, _ in checks]).all()):
        for ok, message, exact in checks:
            if _fails(ok, exact):
                raise ValueError(message())
    for remember in passed:
        remember()


def _require(ok: torch.Tensor, message: Callable[[], str], exact: Callable[[], torch.Tensor] | None = None) -> None:
    """Raises ValueError(message()) unless the 0-d bool tensor `ok` holds, now or at the end of `one_read`.
    Where `ok` can fail when the condition holds (a quick test), `exact()` decides then."""
    checks = getattr(_gathering, "checks", None)
    if checks is not None:
        checks.append((ok, message, exact))
    elif _fails(ok, exact):
        raise ValueError(message())


def _fails(ok: torch.Tensor, exact: Callable[[], torch.Tensor] | None) -> bool:
    return not bool(ok) and (exact is None or not bool(exact()))


def _when_passed(remember: Callable[[], None]) -> None:
    """Calls `remember` once the checks required so far have passed: now, or at the end of `one_read`."""
    passed = getattr(_gathering, "passed", None)
    if passed is not None:
        passed.append(remember)
    else:
        remember()


def tensor(name: str, value, *, ndim: int | None = None, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {str(value.dtype).replace('torch.', '')}")
    return value


def finite(name: str, value: torch.Tensor) -> None:
    if not _tracing():
        _scan(name, value)


def _scan(name: str, value: torch.Tensor, low: float | None = None, high: float | None = None) -> None:
    """The value checks of one tensor from one pass over it: every element finite, and in [low, high]."""
    if value.numel() == 0:
        return
    message = lambda: f"{name} contains NaN or inf values; clean the input (e.g. torch.nan_to_num) first"  # noqa: E731
    if low is None and high is None and value.dtype in (torch.float32, torch.float64):
        _require(value.sum().isfinite(), message, exact=lambda: _all_finite(value))
        return
    least, most = torch.aminmax(value)
    _require(least.isfinite() & most.isfinite(), message)
    if low is not None or high is not None:
        inside = (least >= low) if low is not None else torch.ones_like(least, dtype=torch.bool)
        if high is not None:
            inside = inside & (most <= high)
        _require(inside, lambda: _bounds_message(name, low, high, _first_outside(value, low, high)))


def same_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, value in others.items():
        if value is not None and value.device != reference.device:
            raise ValueError(
                f"{name} is on {value.device} but {reference_name} is on {reference.device}; "
                f"move both to the same device (e.g. {name}.to({reference_name}.device))")


def same_shape(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, value in others.items():
        if value is not None and value.shape != reference.shape:
            raise ValueError(f"{name} must have the shape of {reference_name} {tuple(reference.shape)}, "
                             f"got {tuple(value.shape)}")


def time_map_shape(name: str, value: torch.Tensor, data_name: str, data: torch.Tensor, *,
                   per_channel_allowed: bool = False) -> None:
    """A time map shared by the channels, (B, 1, H, W), or (where allowed) one per channel, (B, C, H, W)."""
    tensor(name, value, ndim=4)
    B, C, H, W = data.shape
    if tuple(value.shape) == (B, 1, H, W) or (per_channel_allowed and tuple(value.shape) == (B, C, H, W)):
        return
    shapes = f"(B, 1, H, W) = {(B, 1, H, W)}" + (f" or (B, C, H, W) = {(B, C, H, W)}" if per_channel_allowed else "")
    raise ValueError(f"{name} must be a time map of shape {shapes} for {data_name} of shape "
                     f"{tuple(data.shape)}, got {tuple(value.shape)}")


def table(value, device: torch.device | None = None) -> torch.Tensor:
    """A variance (or time-embedding) table: 1-D, float32/float64, >= 2 entries, strictly increasing, g[0] >= 0."""
    tensor("table", value, ndim=1, dtypes=(torch.float32, torch.float64))
    if value.numel() < 2:
        raise ValueError(f"table must have at least 2 entries (g[0] = 0 and g[T]), got {value.numel()}")
    if device is not None and value.device != device:
        raise ValueError(f"table is on {value.device} but the data is on {device}; "
                         "pass schedule.table.to(device)")
    if not _tracing():
        key = _table_key(value)
        if key not in _VALID_TABLES:
            finite("table", value)
            _require(value[0] >= 0, lambda: f"table[0] must be >= 0 (a variance), got {float(value[0])}")
            _require((value[1:] > value[:-1]).all(), lambda: _not_increasing(value))
            _when_passed(lambda: _remember_table(key, value))
    return value


# Tables that passed: their key -> the table, which keeps its memory from being reused by another tensor
# while the entry exists. Inference tensors have no version counter: an in-place change to one inside
# inference mode is not seen (as svnr_fast.app.models's table caches).
_VALID_TABLES: collections.OrderedDict = collections.OrderedDict()
_VALID_TABLES_KEPT = 16


def _table_key(value: torch.Tensor) -> tuple:
    return (value.data_ptr(), -1 if value.is_inference() else value._version, value.shape, value.stride(),
            value.dtype, value.device)


def _remember_table(key: tuple, value: torch.Tensor) -> None:
    _VALID_TABLES[key] = value
    if len(_VALID_TABLES) > _VALID_TABLES_KEPT:
        _VALID_TABLES.popitem(last=False)


def _not_increasing(table_: torch.Tensor) -> str:
    first = int(torch.nonzero(~(table_[1:] > table_[:-1]))[0])
    return (f"table must be strictly increasing; table[{first + 1}] = {float(table_[first + 1])} "
            f"<= table[{first}] = {float(table_[first])}")


def per_image(name: str, value, batch: int, device: torch.device, *, dtype: torch.dtype = torch.float32,
              low: float | None = None, high: float | None = None) -> torch.Tensor:
    """A per-image parameter (float or (B,) tensor) as a (B,) tensor of `dtype` on `device`."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(batch)
        if value.dim() != 1 or value.shape[0] not in (1, batch):
            raise ValueError(f"{name} must be a float or a tensor of shape ({batch},) (one value per image), "
                             f"got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the data is on {device}; move it there")
        result = value.to(dtype).expand(batch).contiguous()
        if not _tracing():
            _scan(name, result, low, high)
        return result
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float or a ({batch},) tensor, got {type(value).__name__}")
    value = scalar(name, value, low=low, high=high)
    return torch.full((batch,), value, dtype=dtype, device=device)


def _bounds_message(name: str, low: float | None, high: float | None, bad: float) -> str:
    if low is not None and high is not None:
        return f"{name} must lie in [{low}, {high}], got {bad:g}"
    return f"{name} must be >= {low}, got {bad:g}" if low is not None else f"{name} must be <= {high}, got {bad:g}"


def _all_finite(value: torch.Tensor) -> torch.Tensor:
    least, most = torch.aminmax(value)
    return least.isfinite() & most.isfinite()


def _first_outside(value: torch.Tensor, low: float | None, high: float | None) -> float:
    outside = torch.zeros_like(value, dtype=torch.bool)
    if low is not None:
        outside |= value < low
    if high is not None:
        outside |= value > high
    return value[outside][0].item()


def scalar(name: str, value, *, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a finite float, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(_bounds_message(name, low, high, value))
    return value


def rng_ints(seed, offset) -> tuple[int, int]:
    for name, value in (("seed", seed), ("offset", offset)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
            raise ValueError(f"{name} must be an int in [0, 2**63), got {value!r}")
    return seed, offset


def ordered_pair(name: str, value, what: str = "a pair") -> tuple[float, float]:
    """(low, high) as floats, low < high."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be {what} (low, high) of floats, got {value!r}") from None
    if not low < high:
        raise ValueError(f"{name} must satisfy low < high, got {value!r}")
    return low, high


def clamp_range(clamp) -> tuple[float, float] | None:
    return None if clamp is None else ordered_pair("clamp", clamp, "None or a pair")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Schedule math runs in float32, or float64 for float64 data."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------
# Whole-op checks, shared by svnr_fast.reference and svnr_fast.ops
# ---------------------------------------------------------------------------------------------------

class TrainingSampleArgs(NamedTuple):
    sigma_r: torch.Tensor   # (B,) in the compute dtype of the data (float32, or float64 for float64 data)
    sigma_s: torch.Tensor
    u: torch.Tensor
    table: torch.Tensor
    min_std: float


class ReverseStepArgs(NamedTuple):
    delta: torch.Tensor     # (B,) in the compute dtype of the data
    eta: float
    clamp: tuple[float, float] | None
    table: torch.Tensor


def noise(name: str, value: torch.Tensor | None, data_name: str, data: torch.Tensor) -> None:
    if value is None:
        return
    tensor(name, value)
    same_shape(data_name, data, **{name: value})
    same_device(data_name, data, **{name: value})
    finite(name, value)


@one_read()
def training_sample_args(x0, sigma_r, sigma_s, u, table_, eps_T, eps_prime, seed, offset, t0_per="image",
                         min_std=0.0) -> TrainingSampleArgs:
    tensor("x0", x0, ndim=4)
    finite("x0", x0)
    B, device = x0.shape[0], x0.device
    noise("eps_T", eps_T, "x0", x0)
    noise("eps_prime", eps_prime, "x0", x0)
    rng_ints(seed, offset)
    if t0_per not in ("image", "batch"):
        raise ValueError(f"t0_per must be 'image' (one t0 per image) or 'batch' (one t0 for the batch), got {t0_per!r}")
    if t0_per == "batch" and isinstance(u, torch.Tensor) and u.numel() != 1:
        raise ValueError(f"t0_per='batch' takes one u for the whole batch (a float or a one-element tensor), "
                         f"got u of shape {tuple(u.shape)}")
    dtype = compute_dtype(x0.dtype)
    return TrainingSampleArgs(
        sigma_r=per_image("sigma_r", sigma_r, B, device, dtype=dtype, low=0.0),
        sigma_s=per_image("sigma_s", sigma_s, B, device, dtype=dtype, low=0.0),
        u=per_image("u", u, B, device, dtype=dtype, low=0.0, high=1.0),
        table=table(table_, device),
        min_std=scalar("min_std", min_std, low=0.0))


@one_read()
def top_up_args(y, variance, table_, z, seed, offset) -> torch.Tensor:
    """Checks the top-up's arguments; returns the table in the compute dtype of y."""
    tensor("y", y, ndim=4)
    finite("y", y)
    tensor("variance", variance, ndim=4)
    same_shape("y", y, variance=variance)
    same_device("y", y, variance=variance)
    finite("variance", variance)
    noise("z", z, "y", y)
    rng_ints(seed, offset)
    return table(table_, y.device).to(compute_dtype(y.dtype))


@one_read()
def reverse_step_args(x, eps_hat, tau, delta, table_, eta, z, clamp, seed, offset) -> ReverseStepArgs:
    tensor("x", x, ndim=4)
    finite("x", x)
    tensor("eps_hat", eps_hat, ndim=4)
    same_shape("x", x, eps_hat=eps_hat)
    same_device("x", x, eps_hat=eps_hat, tau=tau)
    finite("eps_hat", eps_hat)
    time_map_shape("tau", tau, "x", x, per_channel_allowed=True)
    if tau.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"tau must be float32 (or float64) like the time maps the ops return, got {tau.dtype}")
    finite("tau", tau)
    noise("z", z, "x", x)
    rng_ints(seed, offset)
    return ReverseStepArgs(
        delta=per_image("delta", delta, x.shape[0], x.device, dtype=compute_dtype(x.dtype), low=0.0),
        eta=scalar("eta", eta, low=0.0, high=1.0),
        clamp=clamp_range(clamp),
        table=table(table_, x.device))


@one_read()
def groupnorm_film_args(h, u, table_, gn_weight, gn_bias, groups, eps, act, *, check_values: bool = True) -> None:
    """check_values=False keeps only the metadata checks (for modules called inside training loops)."""
    _groupnorm_args(h, gn_weight, gn_bias, groups, eps)
    C = h.shape[1]
    time_map_shape("u", u, "h", h)
    tensor("table", table_, ndim=2)
    if table_.shape[0] < 2 or table_.shape[1] != 2 * C:
        raise ValueError(f"table must have shape (K >= 2, 2C = {2 * C}) = [scale | shift] rows, "
                         f"got {tuple(table_.shape)}")
    same_device("h", h, u=u, table=table_, gn_weight=gn_weight, gn_bias=gn_bias)
    if act not in ("silu", "identity"):
        raise ValueError(f"act must be 'silu' or 'identity', got {act!r}")
    if check_values:
        finite("h", h)
        finite("u", u)


@one_read()
def groupnorm_silu_args(h, gn_weight, gn_bias, groups, eps, *, check_values: bool = True) -> None:
    """check_values=False keeps only the metadata checks (for modules called inside training loops)."""
    _groupnorm_args(h, gn_weight, gn_bias, groups, eps)
    same_device("h", h, gn_weight=gn_weight, gn_bias=gn_bias)
    if check_values:
        finite("h", h)


def _groupnorm_args(h, gn_weight, gn_bias, groups, eps) -> None:
    """h (B, C, H, W), GroupNorm weight and bias (C,), groups dividing C, eps > 0: what both ops take."""
    tensor("h", h, ndim=4)
    C = h.shape[1]
    for name, value in (("gn_weight", gn_weight), ("gn_bias", gn_bias)):
        tensor(name, value, ndim=1)
        if value.shape[0] != C:
            raise ValueError(f"{name} must have shape ({C},) for h with {C} channels, got {tuple(value.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or C % groups:
        raise ValueError(f"groups must be a positive int dividing the {C} channels of h, got {groups!r}")
    scalar("eps", eps, low=0.0)
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
