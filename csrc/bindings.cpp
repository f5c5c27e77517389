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

svnr::GroupNormFilmShape groupnorm_film_shape(int dtype, std::int64_t batch, std::int64_t channels,
                                               std::int64_t pixels, std::int64_t groups, std::int64_t knots,
                                               bool channels_last) {
  return svnr::GroupNormFilmShape{batch, channels, pixels, groups, knots, channels_last, dtype};
}

void bind_groupnorm_film(py::module_& m) {
  using std::int64_t;
  using std::uintptr_t;
  const char* shape_doc = "dtype (0 float32, 1 float64, 2 bfloat16, 3 float16), B, C, H*W, groups, K, channels_last";
  m.def("groupnorm_film_forward_cpu",
        [](int dtype, int64_t batch, int64_t channels, int64_t pixels, int64_t groups, int64_t knots,
           bool channels_last, uintptr_t h, uintptr_t u, uintptr_t table, uintptr_t weight, uintptr_t bias,
           uintptr_t out, uintptr_t mean, uintptr_t rstd, double eps, bool silu, int threads) {
          svnr::groupnorm_film_forward_cpu(
              groupnorm_film_shape(dtype, batch, channels, pixels, groups, knots, channels_last), h, u, table,
              weight, bias, out, mean, rstd, eps, silu, threads);
        },
        py::call_guard<py::gil_scoped_release>(), shape_doc);
  m.def("groupnorm_film_backward_cpu",
        [](int dtype, int64_t batch, int64_t channels, int64_t pixels, int64_t groups, int64_t knots,
           bool channels_last, uintptr_t grad_out, uintptr_t h, uintptr_t u, uintptr_t table, uintptr_t weight,
           uintptr_t bias, uintptr_t mean, uintptr_t rstd, uintptr_t grad_h, uintptr_t grad_table,
           uintptr_t grad_weight, uintptr_t grad_bias, bool silu, int threads) {
          svnr::groupnorm_film_backward_cpu(
              groupnorm_film_shape(dtype, batch, channels, pixels, groups, knots, channels_last), grad_out, h, u,
              table, weight, bias, mean, rstd, grad_h, grad_table, grad_weight, grad_bias, silu, threads);
        },
        py::call_guard<py::gil_scoped_release>(), shape_doc);
#ifdef SVNR_WITH_CUDA
  m.def("groupnorm_film_cuda_workspace_bytes",
        [](int dtype, int64_t batch, int64_t channels, int64_t pixels, int64_t groups, int64_t knots,
           bool channels_last) {
          return svnr::groupnorm_film_cuda_workspace_bytes(
              groupnorm_film_shape(dtype, batch, channels, pixels, groups, knots, channels_last));
        },
        shape_doc);
  m.def("groupnorm_film_forward_cuda",
        [](int dtype, int64_t batch, int64_t channels, int64_t pixels, int64_t groups, int64_t knots,
           bool channels_last, uintptr_t h, uintptr_t u, uintptr_t table, uintptr_t weight, uintptr_t bias,
           uintptr_t out, uintptr_t mean, uintptr_t rstd, double eps, bool silu, uintptr_t workspace,
           int device, uintptr_t stream) {
          svnr::groupnorm_film_forward_cuda(
              groupnorm_film_shape(dtype, batch, channels, pixels, groups, knots, channels_last), h, u, table,
              weight, bias, out, mean, rstd, eps, silu, workspace, device, stream);
        },
        py::call_guard<py::gil_scoped_release>(), shape_doc);
  m.def("groupnorm_film_backward_cuda",
        [](int dtype, int64_t batch, int64_t channels, int64_t pixels, int64_t groups, int64_t knots,
           bool channels_last, uintptr_t grad_out, uintptr_t h, uintptr_t u, uintptr_t table, uintptr_t weight,
           uintptr_t bias, uintptr_t mean, uintptr_t rstd, uintptr_t grad_h, uintptr_t grad_table,
           uintptr_t grad_weight, uintptr_t grad_bias, bool silu, uintptr_t workspace, int device,
           uintptr_t stream) {
          svnr::groupnorm_film_backward_cuda(
              groupnorm_film_shape(dtype, batch, channels, pixels, groups, knots, channels_last), grad_out, h, u,
              table, weight, bias, mean, rstd, grad_h, grad_table, grad_weight, grad_bias, silu, workspace,
              device, stream);
        },
        py::call_guard<py::gil_scoped_release>(), shape_doc);
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "svnr_fast C++/CUDA kernels (no libtorch dependency: tensors arrive as pointers)";
  m.def("build_info", &build_info, "What this module was compiled with");
#ifdef SVNR_WITH_CUDA
  m.def("cuda_driver_version", &svnr::cuda_driver_version,
        "The installed driver's CUDA version, 0 when no driver is present, -1 on error");
#endif
  bind_groupnorm_film(m);
}
