#include <pybind11/pybind11.h>

#include "svnr_kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
#ifdef SVNR_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = SVNR_CUDA_ARCHS;
  info["cuda_compiler"] = SVNR_CUDA_COMPILER;
  info["cuda_runtime_version"] = svnr::cuda_runtime_version();
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
  info["cuda_compiler"] = "";
  info["cuda_runtime_version"] = py::none();
#endif
  info["cxx_compiler"] = SVNR_CXX_COMPILER;
  info["build_type"] = SVNR_BUILD_TYPE;
#ifdef _OPENMP
  info["openmp"] = true;
  info["openmp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["openmp_max_threads"] = 1;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "svnr_fast C++/CUDA kernels (no libtorch dependency: tensors arrive as pointers)";
  m.def("build_info", &build_info, "What this module was compiled with");
#ifdef SVNR_WITH_CUDA
  m.def("cuda_driver_version", &svnr::cuda_driver_version,
        "The installed driver's CUDA version, 0 when no driver is present, -1 on error");
#endif
}
