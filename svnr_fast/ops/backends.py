"""Which implementation serves each svnr op, on which device, and why; and the registration of the ops.

Every op is defined once in the `svnr` namespace of the dispatcher with one kernel per device key (CPU,
CUDA), as pytorch/extension-cpp does, plus a fake kernel (torch.compile, opcheck). Each device kernel calls
the backend chosen for (op, device) the first time it runs; the choice is then kept, so a call costs one
dict lookup on top of the dispatcher:
  CUDA tensors -> the op's GPU kernel (the CUDA extension where the op has one, else Triton);
  CPU tensors  -> the C++ kernel where the op has one, else the eager reference.
`SVNR_FAST_BACKEND` (read once, when the first op runs) or `set_backend()` overrides the choice:
`reference` forces the reference everywhere; `triton`, `cpp` or `cuda` force that backend for the ops
that have one (the other ops keep their automatic choice). A forced backend that cannot run here raises an
error that says why. Triton kernels run on CPU tensors only when forced and `TRITON_INTERPRET=1` was set
before the kernels were imported (that is how the tests reach them on machines without a GPU).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from functools import lru_cache
from typing import Callable, NamedTuple

import torch

BACKENDS = ("reference", "triton", "cpp", "cuda")
DEVICES = {"CPU": "cpu", "CUDA": "cuda"}      # dispatch key -> device type

# op -> backend -> its implementation on checked arguments: a callable (the reference adapters) or
# "module:function", imported the first time that backend serves the op (Triton and the extension load late)
IMPLEMENTATIONS: dict[str, dict[str, Callable | str]] = {}

_LIBRARY = torch.library.Library("svnr", "DEF")


class Choice(NamedTuple):
    backend: str
    reason: str


class BackendUnavailable(RuntimeError):
    pass


def _from_environment() -> str | None:
    return _parse(os.environ.get("SVNR_FAST_BACKEND", ""), "SVNR_FAST_BACKEND")


def _parse(value: str | None, source: str) -> str | None:
    value = (value or "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in BACKENDS:
        raise BackendUnavailable(f"{source}={value!r} is not a backend; use one of auto, {', '.join(BACKENDS)}")
    return value


_UNREAD = object()
_forced = _UNREAD
_chosen: dict[tuple[str, str], Callable] = {}


def forced() -> str | None:
    """The backend forced by set_backend() or, until that is called, by SVNR_FAST_BACKEND (read once)."""
    global _forced
    if _forced is _UNREAD:
        _forced = _from_environment()
    return _forced


def set_backend(name: str | None) -> None:
    """Force a backend for the ops called from now on ("reference", "triton", "cpp", "cuda"), or go back
    to the automatic choice (None or "auto"). Takes the place of SVNR_FAST_BACKEND."""
    global _forced
    _forced = _parse(name, "backend")
    _chosen.clear()


def forget_choices() -> None:
    """Choose again at the next call of each op (after the machine's state changed, e.g. in tests)."""
    _chosen.clear()


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@lru_cache(maxsize=None)
def _load_extension():
    try:
        from svnr_fast import _C
    except ImportError as err:
        return None, f"{type(err).__name__}: {err}"
    return _C, None


def extension():
    """(svnr_fast._C, None), or (None, why it could not be loaded); loaded on first use, never at import."""
    return _load_extension()


def cuda_stream(device_index: int) -> int:
    """The address of torch's current CUDA stream on a device (what Triton launches on), without the
    torch.cuda.Stream object torch.cuda.current_stream builds."""
    return torch._C._cuda_getCurrentRawStream(device_index)


def unavailable_reason(backend: str, op: str, device_type: str) -> str | None:
    """None when `backend` can run `op` on `device_type` here, else why not."""
    if backend == "reference":
        return None
    if backend not in IMPLEMENTATIONS[op]:
        return f"{op} has no {backend} kernel (it has: {', '.join(IMPLEMENTATIONS[op])})"
    if backend == "triton":
        if not triton_installed():
            return "triton is not installed (pip install triton)"
        if device_type == "cuda":
            return None
        if device_type == "cpu" and _triton_interpret():
            return None
        return f"Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (got {device_type})"
    ext, error = extension()
    if ext is None:
        return f"the C++/CUDA extension svnr_fast._C is not built ({error})"
    if backend == "cpp" and device_type != "cpu":
        return f"the C++ kernel runs on CPU tensors (got {device_type})"
    if backend == "cuda":
        if device_type != "cuda":
            return f"the CUDA kernel runs on CUDA tensors (got {device_type})"
        if not ext.build_info()["cuda"]:
            return "svnr_fast._C was built without CUDA (no nvcc at build time, or SVNR_FAST_CUDA=0)"
    return None


def choose(op: str, device_type: str) -> Choice:
    """The backend that serves `op` for tensors on `device_type`, and why."""
    want = forced()
    if want is not None and (want == "reference" or want in IMPLEMENTATIONS[op]):
        why_not = unavailable_reason(want, op, device_type)
        if why_not is not None:
            raise BackendUnavailable(f"SVNR_FAST_BACKEND={want} asks for the {want} backend of {op}, "
                                     f"but {why_not}")
        return Choice(want, "forced by SVNR_FAST_BACKEND")
    preferred = {"cuda": ("cuda", "triton"), "cpu": ("cpp",)}.get(device_type, ())
    reasons = []
    for backend in preferred:
        if backend not in IMPLEMENTATIONS[op]:
            continue
        why_not = unavailable_reason(backend, op, device_type)
        if why_not is None:
            return Choice(backend, f"fused kernel for {device_type} tensors")
        reasons.append(why_not)
    if not reasons:
        reasons.append(f"{op} has no fused kernel for {device_type} tensors")
    return Choice("reference", "; ".join(reasons))


def load(op: str, backend: str) -> Callable:
    implementation = IMPLEMENTATIONS[op][backend]
    if isinstance(implementation, str):
        module, name = implementation.split(":")
        implementation = getattr(importlib.import_module(module), name)
    return implementation


def implementation(op: str, device_type: str) -> Callable:
    """The implementation that serves `op` on `device_type`, chosen at the first call and kept."""
    key = (op, device_type)
    chosen = _chosen.get(key)
    if chosen is None:
        chosen = _chosen[key] = load(op, choose(op, device_type).backend)
    return chosen


def serve(op: str, device_type: str, implementation: Callable) -> None:
    """Serve `op` on `device_type` with `implementation` until the next set_backend() or forget_choices()
    (benchmarks/bench_host_path.py runs the CUDA implementations on CPU tensors so)."""
    _chosen[(op, device_type)] = implementation


def define(op: str, schema: str, *, fake: Callable, reference: Callable, **fast: str) -> None:
    """Defines svnr::<op> with its fake kernel and one kernel per device, which runs the chosen backend.

    `reference` is the eager implementation on checked arguments; `fast` names the fused ones by backend,
    as "module:function" (imported when first chosen).
    """
    IMPLEMENTATIONS[op] = {"reference": reference, **fast}
    _LIBRARY.define(op + schema)
    torch.library.register_fake(f"svnr::{op}", fake, lib=_LIBRARY)
    for key, device_type in DEVICES.items():
        _LIBRARY.impl(op, _device_kernel(op, device_type), key)


def _device_kernel(op: str, device_type: str) -> Callable:
    key = (op, device_type)

    def kernel(*args):
        chosen = _chosen.get(key)
        if chosen is None:
            chosen = implementation(op, device_type)
        return chosen(*args)

    kernel.__name__ = f"{op}_{device_type}"
    return kernel


def register_autograd(op: str, backward: Callable, setup_context: Callable) -> None:
    """What torch.library.register_autograd registers (an Autograd kernel running an autograd.Function),
    for an op whose schema has no keyword-only or defaulted arguments: without its per-call generic steps
    (re-reading the schema for defaults, a metadata object, a redispatch through Python, Function.apply's
    generic argument handling), a call with gradients costs about half the Python."""
    overload = getattr(torch.ops.svnr, op).default
    if any(argument.kwarg_only or argument.has_default_value() for argument in overload._schema.arguments):
        raise ValueError(f"svnr::{op} has keyword-only or defaulted arguments; use torch.library.register_autograd")
    below_autograd = torch._C._AutoDispatchBelowAutograd

    def forward(ctx, *args):
        with below_autograd():
            output = overload(*args)
        setup_context(ctx, args, output)
        return output

    function = type(f"{op}_autograd", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward)})
    # the engine calls the graph node's apply, whose generic version looks the backward up again each time
    function._backward_cls.apply = backward
    # autograd.Function.apply is Python around the C apply of torch._C._FunctionBase: with no functorch
    # transform active it unwraps tensors left over from finished transforms, then calls the C apply
    c_apply = super(torch.autograd.Function, function).apply
    unwrap_if_dead = torch._C._functorch.unwrap_if_dead

    def kernel(*args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            if torch._C._are_functorch_transforms_active():
                return function.apply(*args)
            return c_apply(*[unwrap_if_dead(a) if isinstance(a, torch.Tensor) else a for a in args])
        with below_autograd():
            return overload(*args)

    _LIBRARY.impl(op, kernel, "Autograd")


def ops() -> tuple[str, ...]:
    return tuple(IMPLEMENTATIONS)
