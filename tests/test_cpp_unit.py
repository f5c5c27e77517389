"""The C++ unit tests in csrc/tests, compiled with the system's C++ compiler and run: the per-element math the CPU
and CUDA kernels share (test_math.cpp: conversions, exp, the schedule lookups, Philox known-answer vectors,
Box-Muller), and the CPU kernels' helpers (test_cpu_common.cpp: the vectorised Philox and the normals' pixel
mapping, the direct-index time lookup) once per instruction set the extension runs here, with that set's flags."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cpp_isas import ISAS

CSRC = Path(__file__).resolve().parents[1] / "csrc"
COMPILER = shutil.which(os.environ.get("CXX", "g++"))
FLAGS = ["-std=c++17", "-O2", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", f"-I{CSRC}"]
ISA_FLAGS = {"baseline": [], "avx2": ["-march=x86-64-v3"], "avx512": ["-march=x86-64-v4"]}

pytestmark = pytest.mark.skipif(COMPILER is None, reason="no C++ compiler (g++ or $CXX)")


def compile_and_run(source: str, flags: list[str], tmp_path: Path) -> None:
    binary = tmp_path / Path(source).stem
    build = subprocess.run([COMPILER, *FLAGS, *flags, str(CSRC / "tests" / source), "-o", str(binary)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(binary)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_math(tmp_path):
    compile_and_run("test_math.cpp", [], tmp_path)


@pytest.mark.parametrize("isa", ISAS or ["baseline"])
def test_cpu_common(isa, tmp_path):
    compile_and_run("test_cpu_common.cpp", [f"-DSVNR_CPU_NAMESPACE=cpu_{isa}", *ISA_FLAGS[isa]], tmp_path)
