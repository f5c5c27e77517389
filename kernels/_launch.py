"""Launching a compiled Triton kernel in a few microseconds of Python.

`kernel[grid](*args)` spends ~20 us of Python per launch in Triton's JITFunction.run: it binds ~35 positional
arguments into a dict, specialises each one (type, 16-byte alignment of pointers, divisibility by 16 and
== 1 of ints) into a list, turns that list and the options into a string key and looks the compiled kernel
up by it. `Launcher` does that once per specialisation, keeps the CompiledKernel and then hands Triton's C
launch function what CudaLauncher.__call__ would (tests/test_host_path.py compares them), calling the
launcher itself where it has scratch memory to allocate.

The key of a call is computed by a small function generated for the kernel's argument layout (`_key_source`):
- a tensor contributes its dtype, and all tensors together whether every data pointer is 16-byte aligned
  (a call with any unaligned pointer takes Triton's path, which specialises each pointer on its own);
- an int Triton specialises contributes its value; one it does not (`do_not_specialize`) the width class
  of its value (i32 / i64 / u64), as Triton's type for it depends on that alone;
- a float parameter annotated with its type contributes nothing (Triton fixes its type);
- anything else is specialised by Triton's own specialize function;
- the constexprs (keyword arguments) contribute their values.
Two calls with equal keys get the same kernel from Triton, with one exception that changes no result: at a
position that held an int, a bool or an integral float equal to it (True == 1 == 1.0 in Python) finds the
int's kernel. The knobs JITFunction.run folds into its options (debug, instrumentation mode, fpsan casts)
and Triton's hooks (pre-run hooks, a stages inspection hook) are checked on every call: any change, a
JITFunction.run replaced by another function, and any call whose key is not cached yet go through
JITFunction.run, which compiles as usual; the launch that follows fills the cache. With no launch hook
registered (Triton's hook chains empty) no launch metadata is built and the C launcher gets None for the
hooks, which it then does not call. Unlike JITFunction.run a cached launch does not re-check that module
globals the kernel read when it was compiled still have their values (our kernels read no mutable globals).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from triton import knobs
from triton._C.libtriton import native_specialize_impl
from triton.compiler import CompiledKernel
from triton.knobs import HookChain
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

try:
    from triton.backends.nvidia.driver import CudaLauncher
except ImportError:   # a Triton without the NVIDIA backend: launches go through the launcher's __call__
    CudaLauncher = None

_genuine_run = [None]     # JITFunction.run, once seen to be Triton's own


def _genuine(run) -> bool:
    if getattr(run, "__module__", None) == "triton.runtime.jit" and run.__qualname__ == "JITFunction.run":
        _genuine_run[0] = run
        return True
    return False


_INT32 = (-(1 << 31), 1 << 31)
_INT64 = (-(1 << 63), 1 << 63)
_FIXED_TYPES = ("u1", "fp", "bf")     # annotations Triton does not specialise on (create_function_from_signature)


class _Entry(NamedTuple):
    compiled: object            # the CompiledKernel
    launcher: object            # its launcher (CompiledKernel.run; Triton's CudaLauncher on NVIDIA GPUs)
    # the launcher's C launch function and its fixed arguments, when the launcher's __call__ would only
    # forward to it (no scratch memory to allocate, no sanitizer); else None
    launch: object
    fixed: tuple                # (function, cooperative grid, PDL, packed metadata) / (annotations, signature)
    fixed_tail: tuple
    constexprs: tuple           # the constexpr arguments in signature order (the launcher takes every parameter)


def _options_state() -> tuple:
    """What JITFunction.run reads from Triton's knobs into every call's options, and so into its key."""
    return (knobs.runtime.debug, knobs.compilation.instrumentation_mode,
            knobs.compilation.fpsan_homomorphic_casts)


class Launcher:
    """Launches one JITFunction: `launcher(grid, device, args, constants)` as `kernel[grid](*args, **constants)`
    on `device` (an index; another device than the current one is switched to for the launch)."""

    def __init__(self, kernel: JITFunction, options: dict):
        self.kernel = kernel
        self.options = options        # launch options (num_warps, ...), the same on every call
        self._keys = {}               # number of positional arguments -> the generated key function
        self._entries: dict[tuple, _Entry] = {}
        self._state = None

    def __call__(self, grid: tuple, device: int, args: tuple, constants: dict) -> None:
        if type(self.kernel).run is not _genuine_run[0] and not _genuine(type(self.kernel).run):
            self.kernel[grid](*args, **constants, **self.options)   # JITFunction.run instrumented: launch through it
            return
        active = driver.active
        current = active.get_current_device()
        if device != current:
            with torch.cuda.device(device):
                return self(grid, device, args, constants)
        key_of = self._keys.get(len(args))
        if key_of is None:
            key_of = self._keys[len(args)] = _key_function(self.kernel, args)
        try:
            key = key_of(*args)
        except (AttributeError, TypeError):   # a tensor position given something else: Triton sorts it out
            key = None
        if key is not None:
            key = (current, key, *constants.items())
        entry = self._entries.get(key)
        runtime = knobs.runtime
        if entry is None or self.kernel.pre_run_hooks or runtime.add_stages_inspection_hook is not None \
                or _options_state() != self._state:
            self._launch_through_triton(key, grid, args, constants)
            return
        stream = active.get_current_stream(current)
        bound = args + entry.constexprs
        dims = len(grid)
        grid_1 = grid[1] if dims > 1 else 1
        grid_2 = grid[2] if dims > 2 else 1
        enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
        if (enter is None or type(enter) is HookChain and not enter.calls) and \
                (leave is None or type(leave) is HookChain and not leave.calls):
            # the C launcher would call hook chains with nothing in them with this metadata: skip building it
            metadata = enter = leave = None
        else:
            metadata = entry.compiled.launch_metadata(grid, stream, *bound)
        if entry.launch is not None:
            entry.launch(grid[0], grid_1, grid_2, stream, *entry.fixed, metadata, enter, leave, None, None,
                         *entry.fixed_tail, bound)
        else:
            entry.launcher(grid[0], grid_1, grid_2, stream, entry.compiled.function, entry.compiled.packed_metadata,
                           metadata, enter, leave, *bound)

    def _launch_through_triton(self, key, grid, args, constants) -> None:
        compiled = self.kernel[grid](*args, **constants, **self.options)
        if key is None or not isinstance(compiled, CompiledKernel):   # e.g. a future under async compilation
            return
        state = _options_state()
        if state != self._state:
            self._entries.clear()
            self._state = state
        later = self.kernel.params[len(args):]
        constexprs = tuple(constants[p.name] if p.name in constants else p.default for p in later)
        launcher = compiled.run
        direct = _forwards_to_launch(launcher)
        self._entries[key] = _Entry(
            compiled, launcher, launcher.launch if direct else None,
            (compiled.function, launcher.launch_cooperative_grid, launcher.launch_pdl, compiled.packed_metadata)
            if direct else (),
            (launcher.arg_annotations, launcher.kernel_signature) if direct else (), constexprs)


def _forwards_to_launch(launcher) -> bool:
    """Whether calling `launcher` (Triton's CudaLauncher) only forwards to its C launch function: no global
    or profile scratch memory to allocate, no sanitizer. Its __call__ then passes None for both scratches."""
    if CudaLauncher is None or type(launcher).__call__ is not CudaLauncher.__call__:
        return False
    return not (launcher.gsan_enabled or launcher.global_scratch_size or launcher.profile_scratch_size)


def _key_function(kernel: JITFunction, args: tuple):
    namespace = {"specialize": native_specialize_impl, "backend": None}
    source = _key_source(kernel, args, namespace)
    exec(source, namespace)
    return namespace["key"]


def _key_source(kernel: JITFunction, args: tuple, namespace: dict) -> str:
    """The source of `key(a0, a1, ...)` for calls with the positional arguments laid out as `args` are."""
    from triton.compiler import make_backend
    namespace["backend"] = make_backend(driver.active.get_current_target())
    names = [f"a{i}" for i in range(len(args))]
    parts, pointers = [], []
    for name, param, value in zip(names, kernel.params, args):
        annotation = param.annotation_type
        if param.is_constexpr:
            parts.append(name)
        elif isinstance(annotation, str) and annotation.startswith(_FIXED_TYPES):
            continue
        elif isinstance(value, torch.Tensor) and not (param.is_const or param.do_not_specialize
                                                      or param.do_not_specialize_on_alignment or annotation):
            parts.append(f"{name}.dtype")
            pointers.append(f"{name}.data_ptr()")
        elif type(value) is int and not (param.is_const or annotation):
            if param.do_not_specialize:
                parts.append(f"(0 if {_INT32[0]} <= {name} < {_INT32[1]} else "
                             f"1 if {_INT64[0]} <= {name} < {_INT64[1]} else 2)")
            else:
                parts.append(name)
        else:
            parts.append(f"specialize(backend, {name}, {param.is_const}, {not param.do_not_specialize}, "
                         f"{not param.do_not_specialize_on_alignment})")
    # any unaligned pointer: Triton's key then depends on which ones, so the call is not keyed here
    check = f"    if ({' | '.join(pointers)}) & 15:\n        return None\n" if pointers else ""
    return f"def key({', '.join(names)}):\n{check}    return ({', '.join(parts)},)\n"


_LAUNCHERS: dict[int, Launcher] = {}    # by id(kernel): a JITFunction's hash takes a lock and hashes its source


def launcher(kernel, options: dict) -> Launcher | None:
    """The Launcher of `kernel` (kept for the process), or None for a kernel Triton interprets
    (TRITON_INTERPRET=1), which is launched as written."""
    found = _LAUNCHERS.get(id(kernel))
    if found is None:
        if not isinstance(kernel, JITFunction):
            return None
        found = _LAUNCHERS[id(kernel)] = Launcher(kernel, options)
    return found
