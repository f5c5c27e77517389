"""Build svnr_fast._C with csrc/groupnorm_film_cuda.cu running on the CPU emulation of this folder (README.md).

`build(directory)` translates the .cu file into C++ in `directory` (never into the repository), compiles it
with g++ together with csrc/bindings.cpp, the CPU kernels (baseline only) and emu.cpp, and returns the path of
the extension module `directory/_C<EXT_SUFFIX>`, which tests load under a name of their own.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pybind11

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent
KERNELS = CSRC / "groupnorm_film_cuda.cu"

_DYNAMIC_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?unsigned\s+char\s+(\w+)\s*\[\s*\]\s*;")
_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)\s*<<<")
_LAUNCH_END = re.compile(r">>>\s*\(")


def compiler() -> str | None:
    """The C++ compiler: $CXX, else g++ on the PATH (the emulation needs GNU C++ and ucontext)."""
    return shutil.which(os.environ.get("CXX", "g++"))


def translate(source: str) -> str:
    """CUDA C++ -> C++ for the emulated runtime: launches become svnr_launch("name", kernel, grid, block, ...)(
    args), the dynamic shared memory declaration a pointer to the emulated block's buffer."""
    source = _DYNAMIC_SHARED.sub(r"unsigned char* \1 = svnr_emu_dynamic_shared();", source)
    source = _LAUNCH.sub(lambda m: f'svnr_launch("{m.group(1)}", {m.group(1)}, ', source)
    source = _LAUNCH_END.sub(")(", source)
    for left in ("<<<", ">>>", "extern __shared__"):
        if left in re.sub(r"\s+", " ", source):
            raise RuntimeError(f"CUDA emulation: {KERNELS.name} has a '{left}' the translation does not handle; "
                               f"extend the patterns in {Path(__file__).name}")
    return source


def build(directory: Path) -> Path:
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("CUDA emulation: no C++ compiler (set CXX or install g++)")
    directory = Path(directory)
    translated = directory / "groupnorm_film_cuda_emulated.cpp"
    translated.write_text(translate(KERNELS.read_text()))
    flags = ["-std=c++17", "-O1", "-fPIC", "-fopenmp", "-Wno-unknown-pragmas", "-DSVNR_WITH_CUDA=1",
             *(f'-DSVNR_{name}="emulated"' for name in ("CXX_COMPILER", "CUDA_COMPILER", "CUDA_ARCHS",
                                                          "BUILD_TYPE")),
             f"-I{HERE / 'include'}", f"-I{CSRC}", f"-I{sysconfig.get_paths()['include']}",
             f"-I{pybind11.get_include()}"]
    # the CPU kernels only for the baseline instruction set (cpu_dispatch.cpp then offers that one)
    kernels = sorted(CSRC.glob("*_cpu.cpp"))
    sources = [CSRC / "bindings.cpp", CSRC / "cpu_dispatch.cpp", *kernels, translated, HERE / "emu.cpp"]
    objects = [directory / f"{source.stem}.o" for source in sources]

    def compile_one(pair):
        source, obj = pair
        extra = ["-DSVNR_CPU_NAMESPACE=cpu_baseline"] if source in kernels else []
        return subprocess.run([cxx, *flags, *extra, "-c", str(source), "-o", str(obj)], capture_output=True,
                              text=True)

    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        results = list(pool.map(compile_one, zip(sources, objects)))
    module = directory / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    results.append(subprocess.run([cxx, "-shared", "-fopenmp", *map(str, objects), "-o", str(module)],
                                  capture_output=True, text=True))
    for result in results:
        if result.returncode != 0:
            raise RuntimeError(f"CUDA emulation: {' '.join(result.args[:2])} ... failed:\n{result.stderr}")
    return module


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
