"""`svnr info` / `python -m svnr_fast.info`: how svnr_fast was built and which backend serves each op here."""
from __future__ import annotations

import os
import platform

import torch

from . import __version__
from .ops import backends


def report() -> str:
    lines = [f"svnr_fast {__version__}  (torch {torch.__version__}, python {platform.python_version()})"]
    ext, error = backends.extension()
    if ext is None:
        lines.append(f"extension svnr_fast._C: not available ({error})")
    else:
        info = ext.build_info()
        cuda = (f"CUDA {info['cuda_compiler']}, archs {info['cuda_archs']}, runtime {info['cuda_runtime_version']}"
                if info["cuda"] else "no CUDA")
        threads = f"OpenMP ({info['openmp_max_threads']} threads)" if info["openmp"] else "no OpenMP"
        lines.append(f"extension svnr_fast._C: {info['cxx_compiler']}, {info['build_type']}, {threads}, {cuda}, "
                     f"CPU kernels {ext.cpu_isa()} (SVNR_FAST_CPU_ISA; here: {info['cpu_isas']})")
    if backends.triton_installed():
        import triton
        interpret = " (TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1" else ""
        lines.append(f"triton {triton.__version__}{interpret}")
    else:
        lines.append("triton: not installed")
    # torch.cuda.is_available() asks the driver without creating a context
    gpu = torch.cuda.is_available()
    lines.append(f"CUDA GPU: {torch.cuda.get_device_name(0) if gpu else 'none visible to torch'}")
    lines.append(f"SVNR_FAST_BACKEND={backends.forced() or 'auto'}")
    lines.append("")
    devices = ["cpu", "cuda"]
    width = max(len(op) for op in backends.ops())
    for op in backends.ops():
        for device in devices:
            try:
                choice = backends.choose(op, device)
                text = f"{choice.backend:<9} {choice.reason}"
            except backends.BackendUnavailable as err:
                text = f"error     {err}"
            lines.append(f"{op:<{width}}  {device:<4}  {text}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
