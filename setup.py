"""Builds svnr_fast._C through CMake (pybind11 + ninja); everything else is plain setuptools metadata.

Environment:
  SVNR_FAST_CUDA=auto|0|1     compile the CUDA sources: when nvcc is found (auto), never, or required.
  SVNR_FAST_CUDA_ARCH=90      CMAKE_CUDA_ARCHITECTURES (semicolon-separated list allowed).
  SVNR_FAST_REQUIRE_EXT=1     fail the install when _C cannot be built (default: warn, the package then
                              runs on its PyTorch reference path).
  SVNR_FAST_BUILD_TYPE=Release
"""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        try:
            self._cmake_build(ext)
        except (OSError, subprocess.CalledProcessError) as err:
            if os.environ.get("SVNR_FAST_REQUIRE_EXT", "0") == "1":
                raise
            print(f"\n*** svnr_fast: the C++/CUDA extension was not built ({err}).\n"
                  "*** The package still works on its PyTorch reference path; `svnr info` says so.\n"
                  "*** Set SVNR_FAST_REQUIRE_EXT=1 to make this an error.\n", file=sys.stderr)

    def _cmake_build(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = os.environ.get("SVNR_FAST_CUDA", "auto").lower()
        if cuda not in ("auto", "0", "1"):
            raise OSError(f"SVNR_FAST_CUDA must be auto, 0 or 1, got {cuda!r}")
        configure = [
            "cmake", str(ROOT), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('SVNR_FAST_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DSVNR_FAST_CUDA={cuda}",
            f"-DSVNR_FAST_CUDA_ARCH={os.environ.get('SVNR_FAST_CUDA_ARCH', '90')}",
            f"-DSVNR_FAST_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
        ]
        subprocess.run(configure, cwd=build_dir, check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", ".", "--target", "_C", "-j", jobs], cwd=build_dir, check=True)


setup(ext_modules=[CMakeExtension("svnr_fast._C")], cmdclass={"build_ext": CMakeBuild})
