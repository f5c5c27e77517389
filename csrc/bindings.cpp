#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>

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

// A tensor's address as Python's `tensor.data_ptr()` gives it (0 for none).
using Address = std::uintptr_t;

void* pointer(Address address) { return reinterpret_cast<void*>(address); }

// groupnorm_film's Python arguments: shape = (dtype code, B, C, H*W, groups, K, channels_last) and the
// addresses of (h, u, table, weight, bias, out, mean, rstd, grad_out, grad_h, grad_table, grad_weight,
// grad_bias), 0 for those the pass does not use.
using FilmShape = std::array<std::int64_t, 7>;
using FilmTensors = std::array<Address, 13>;

svnr::GroupNormFilmArgs film_args(const FilmShape& shape, const FilmTensors& t, double eps, bool silu) {
  svnr::GroupNormFilmArgs args;
  args.dtype = int(shape[0]);
  args.batch = shape[1];
  args.channels = shape[2];
  args.pixels = shape[3];
  args.groups = shape[4];
  args.knots = shape[5];
  args.channels_last = shape[6] != 0;
  args.h = pointer(t[0]);
  args.u = pointer(t[1]);
  args.table = pointer(t[2]);
  args.weight = pointer(t[3]);
  args.bias = pointer(t[4]);
  args.out = pointer(t[5]);
  args.mean = pointer(t[6]);
  args.rstd = pointer(t[7]);
  args.grad_out = pointer(t[8]);
  args.grad_h = pointer(t[9]);
  args.grad_table = pointer(t[10]);
  args.grad_weight = pointer(t[11]);
  args.grad_bias = pointer(t[12]);
  args.eps = eps;
  args.silu = silu;
  return args;
}

svnr::Pass pass_of(bool backward) { return backward ? svnr::Pass::kBackward : svnr::Pass::kForward; }

void bind_groupnorm_film(py::module_& m) {
  const char* doc =
      "groupnorm_film_<device>(backward, shape, tensors, eps, silu, ...): shape = (dtype code (0 float32, 1 "
      "float64, 2 bfloat16, 3 float16), B, C, H*W, groups, K, channels_last), tensors = the addresses of (h, u, "
      "table, weight, bias, out, mean, rstd, grad_out, grad_h, grad_table, grad_weight, grad_bias), 0 where unused";
  m.def(
      "groupnorm_film_cpu",
      [](bool backward, const FilmShape& shape, const FilmTensors& tensors, double eps, bool silu, int threads) {
        svnr::groupnorm_film_cpu(pass_of(backward), film_args(shape, tensors, eps, silu), threads);
      },
      py::call_guard<py::gil_scoped_release>(), doc);
#ifdef SVNR_WITH_CUDA
  m.def(
      "groupnorm_film_cuda_workspace_bytes",
      [](const FilmShape& shape) { return svnr::groupnorm_film_cuda_workspace_bytes(film_args(shape, {}, 0, 0)); },
      "Bytes of device scratch groupnorm_film_cuda needs for this shape");
  m.def(
      "groupnorm_film_cuda",
      [](bool backward, const FilmShape& shape, const FilmTensors& tensors, double eps, bool silu,
         Address workspace, int device, Address stream) {
        svnr::groupnorm_film_cuda(pass_of(backward), film_args(shape, tensors, eps, silu),
                                  {pointer(workspace), device, pointer(stream)});
      },
      py::call_guard<py::gil_scoped_release>(), doc);
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "svnr_fast C++/CUDA kernels (no libtorch dependency: tensors arrive as addresses)";
  m.def("build_info", &build_info, "What this module was compiled with");
#ifdef SVNR_WITH_CUDA
  m.def("cuda_driver_version", &svnr::cuda_driver_version,
        "The installed driver's CUDA version, 0 when no driver is present, -1 on error");
#endif
  bind_groupnorm_film(m);
}
