"""Which implementation serves each op, on which device, and why.

Dispatch is by the device of the data, decided at call time (never by import side effects):
  CUDA tensors -> the op's GPU kernel (Triton or the CUDA extension), CPU tensors -> the C++ kernel
  where the op has one, else the eager reference.
`SVNR_FAST_BACKEND` overrides the choice: `reference` forces the reference everywhere; `triton`, `cpp`
or `cuda` force that backend for the ops that have one (the other ops keep their automatic choice). A
forced backend that cannot run here raises an error that says why. Triton kernels run on CPU tensors
only when forced and `TRITON_INTERPRET=1` was set before the kernels were imported (that is how the
tests reach them on machines without a GPU).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from functools import lru_cache
from typing import Callable, NamedTuple

import torch

BACKENDS = ("reference", "triton", "cpp", "cuda")

# op -> its fast backends, each with the module and function that implement it on checked arguments
FAST = {
    "gamma": {"triton": ("svnr_fast.kernels.lookup", "gamma")},
    "time_from_variance": {"triton": ("svnr_fast.kernels.lookup", "time_from_variance")},
    "time_map": {"triton": ("svnr_fast.kernels.lookup", "time_map")},
    "training_sample": {"triton": ("svnr_fast.kernels.training_sample", "training_sample")},
    "reverse_step": {"triton": ("svnr_fast.kernels.reverse_step", "reverse_step")},
    "groupnorm_film": {"cpp": ("svnr_fast.kernels.groupnorm_film", "groupnorm_film"),
                       "cuda": ("svnr_fast.kernels.groupnorm_film", "groupnorm_film")},
    "groupnorm_film_backward": {"cpp": ("svnr_fast.kernels.groupnorm_film", "groupnorm_film_backward"),
                                "cuda": ("svnr_fast.kernels.groupnorm_film", "groupnorm_film_backward")},
}
REFERENCE = {
    "gamma": "_gamma", "time_from_variance": "_time_from_variance", "time_map": "_time_map",
    "training_sample": "_training_sample", "reverse_step": "_reverse_step", "groupnorm_film": "_groupnorm_film",
    "groupnorm_film_backward": "_groupnorm_film_backward",
}
OPS = tuple(REFERENCE)


class Choice(NamedTuple):
    backend: str
    reason: str


class BackendUnavailable(RuntimeError):
    pass


def forced() -> str | None:
    value = os.environ.get("SVNR_FAST_BACKEND", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in BACKENDS:
        raise BackendUnavailable(f"SVNR_FAST_BACKEND={value!r} is not a backend; use one of "
                                 f"auto, {', '.join(BACKENDS)}")
    return value


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def extension():
    from . import _ext
    return _ext.module()


def unavailable_reason(backend: str, op: str, device_type: str) -> str | None:
    """None when `backend` can run `op` on `device_type` here, else why not."""
    if backend == "reference":
        return None
    if backend not in FAST[op]:
        return f"{op} has no {backend} kernel (it has: {', '.join(['reference', *FAST[op]])})"
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
    if want is not None and (want == "reference" or want in FAST[op]):
        why_not = unavailable_reason(want, op, device_type)
        if why_not is not None:
            raise BackendUnavailable(f"SVNR_FAST_BACKEND={want} asks for the {want} backend of {op}, "
                                     f"but {why_not}")
        return Choice(want, "forced by SVNR_FAST_BACKEND")
    preferred = {"cuda": ("cuda", "triton"), "cpu": ("cpp",)}.get(device_type, ())
    reasons = []
    for backend in preferred:
        if backend not in FAST[op]:
            continue
        why_not = unavailable_reason(backend, op, device_type)
        if why_not is None:
            return Choice(backend, f"fused kernel for {device_type} tensors")
        reasons.append(why_not)
    if not reasons:
        reasons.append(f"{op} has no fused kernel for {device_type} tensors")
    return Choice("reference", "; ".join(reasons))


@lru_cache(maxsize=None)
def _load(op: str, backend: str) -> Callable:
    if backend == "reference":
        from . import reference
        return getattr(reference, REFERENCE[op])
    module, name = FAST[op][backend]
    return getattr(importlib.import_module(module), name)


def implementation(op: str, device: torch.device) -> Callable:
    return _load(op, choose(op, device.type).backend)
