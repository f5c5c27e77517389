#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <optional>

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
  info["cpu_isas"] = svnr::cpu_isas();
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
// grad_bias), 0 for those the pass does not use. K = 0: no table, no FiLM (svnr::groupnorm_silu).
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
  args.film = args.knots != 0;
  return args;
}

svnr::Pass pass_of(bool backward) { return backward ? svnr::Pass::kBackward : svnr::Pass::kForward; }

void bind_groupnorm_film(py::module_& m) {
  const char* doc =
      "groupnorm_film_<device>(backward, shape, tensors, eps, silu, ...): shape = (dtype code (0 float32, 1 "
      "float64, 2 bfloat16, 3 float16), B, C, H*W, groups, K, channels_last), tensors = the addresses of (h, u, "
      "table, weight, bias, out, mean, rstd, grad_out, grad_h, grad_table, grad_weight, grad_bias), 0 where unused; "
      "K = 0 (CPU only): GroupNorm + act without FiLM";
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

// A tensor viewed as (B, C, H*W): (address, dtype code, stride_b, stride_c, stride_p); address 0 for none.
using View = std::array<std::int64_t, 5>;
// (B, C, H*W)
using Sizes = std::array<std::int64_t, 3>;
// A variance table: (address, T) for T + 1 entries.
using TableArg = std::array<std::int64_t, 2>;

svnr::Strided strided(const View& v) { return {pointer(Address(v[0])), int(v[1]), v[2], v[3], v[4]}; }

svnr::Table table_of(const TableArg& t) { return {pointer(Address(t[0])), int(t[1])}; }

void bind_cpu_ops(py::module_& m) {
  m.def("cpu_isa", &svnr::cpu_isa, "The instruction set the CPU kernels run with");
  m.def("cpu_isas", &svnr::cpu_isas, "The instruction sets compiled in that this CPU supports, best first");
  m.def("set_cpu_isa", &svnr::set_cpu_isa, "Run the CPU kernels with another of cpu_isas()");
  m.def(
      "lookup_cpu",
      [](int op, const Sizes& sizes, int dtype, const View& input, const TableArg& table, Address out, int threads) {
        svnr::LookupArgs args;
        args.op = static_cast<svnr::Lookup>(op);
        args.batch = sizes[0];
        args.channels = sizes[1];
        args.pixels = sizes[2];
        args.dtype = dtype;
        args.input = strided(input);
        args.table = table_of(table);
        args.out = pointer(out);
        svnr::lookup_cpu(args, threads);
      },
      py::call_guard<py::gil_scoped_release>(),
      "lookup_cpu(op (0 gamma, 1 time_from_variance, 2 time_map), (B, C, H*W), compute dtype code, input view, "
      "(table address, T), out address, threads)");
  m.def(
      "reverse_step_cpu",
      [](const Sizes& sizes, const std::array<View, 4>& views, bool per_channel, const std::array<Address, 4>& tensors,
         const TableArg& table, double eta, std::optional<std::array<double, 2>> clamp, std::uint64_t seed,
         std::uint64_t offset, int threads) {
        svnr::ReverseStepArgs args;
        args.batch = sizes[0];
        args.channels = sizes[1];
        args.pixels = sizes[2];
        args.x = strided(views[0]);
        args.eps_hat = strided(views[1]);
        args.z = strided(views[2]);
        args.tau = strided(views[3]);
        args.per_channel = per_channel;
        args.delta = pointer(tensors[0]);
        args.x_new = pointer(tensors[1]);
        args.tau_new = pointer(tensors[2]);
        args.x0_hat = pointer(tensors[3]);
        args.table = table_of(table);
        args.eta = eta;
        args.clamp = clamp.has_value();
        if (clamp) {
          args.clamp_min = (*clamp)[0];
          args.clamp_max = (*clamp)[1];
        }
        args.seed = seed;
        args.offset = offset;
        svnr::reverse_step_cpu(args, threads);
      },
      py::call_guard<py::gil_scoped_release>(),
      "reverse_step_cpu((B, C, H*W), views of (x, eps_hat, z, tau), per_channel, addresses of (delta, x_new, "
      "tau_new, x0_hat), (table address, T), eta, (clamp_min, clamp_max) or None, seed, offset, threads)");
  m.def(
      "training_sample_cpu",
      [](const Sizes& sizes, const std::array<View, 3>& views, const std::array<Address, 7>& tensors,
         const TableArg& table, bool correlated, bool per_channel, bool batch_t0, double min_std, std::uint64_t seed,
         std::uint64_t offset, int threads) {
        svnr::TrainingSampleArgs args;
        args.batch = sizes[0];
        args.channels = sizes[1];
        args.pixels = sizes[2];
        args.x0 = strided(views[0]);
        args.eps_T = strided(views[1]);
        args.eps_prime = strided(views[2]);
        args.sigma_r = pointer(tensors[0]);
        args.sigma_s = pointer(tensors[1]);
        args.u = pointer(tensors[2]);
        args.y = pointer(tensors[3]);
        args.x_t = pointer(tensors[4]);
        args.tau = pointer(tensors[5]);
        args.target = pointer(tensors[6]);
        args.table = table_of(table);
        args.correlated = correlated;
        args.per_channel = per_channel;
        args.batch_t0 = batch_t0;
        args.min_std = min_std;
        args.seed = seed;
        args.offset = offset;
        svnr::training_sample_cpu(args, threads);
      },
      py::call_guard<py::gil_scoped_release>(),
      "training_sample_cpu((B, C, H*W), views of (x0, eps_T, eps_prime), addresses of (sigma_r, sigma_s, u, y, x_t, "
      "tau, target), (table address, T), correlated, per_channel, batch_t0, min_std, seed, offset, threads)");
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
  bind_cpu_ops(m);
}
