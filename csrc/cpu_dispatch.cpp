// The CPU entry points: argument checks, then the kernels of the instruction set chosen at run time.
//
// CMakeLists.txt compiles the kernel sources once per instruction set it can target (baseline x86-64 or the
// host's baseline elsewhere; on x86-64 also x86-64-v3 (AVX2, FMA, F16C) and x86-64-v4 (AVX-512)), defining
// SVNR_CPU_AVX2 / SVNR_CPU_AVX512 here for the sets it built. This file itself is compiled for the baseline.
// The wider sets matter (groupnorm_film forward at 2x64x128x128 float32, one thread: 2.5 ns per element
// baseline, 1.3 with AVX2, 1.0 with AVX-512). They are tuned generically: GCC's tuning for this machine's AMD
// cores (and -mtune-ctrl=use_gather) uses hardware gathers, which made the forward 2-3x slower here.
#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "cpu_kernels.h"
#include "svnr_kernels.h"

namespace svnr {
namespace {

struct CpuKernels {
  const char* name;
  bool (*supported)();
  decltype(&cpu_baseline::groupnorm_film) groupnorm_film;
  decltype(&cpu_baseline::lookup) lookup;
  decltype(&cpu_baseline::reverse_step) reverse_step;
  decltype(&cpu_baseline::training_sample) training_sample;
};

#define SVNR_CPU_KERNELS_OF(isa) isa::groupnorm_film, isa::lookup, isa::reverse_step, isa::training_sample

bool always() { return true; }

#if defined(SVNR_CPU_AVX2) || defined(SVNR_CPU_AVX512)
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
         __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("movbe");
}
#endif

#ifdef SVNR_CPU_AVX512
bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512cd");
}
#endif

// Best first.
const CpuKernels kCompiled[] = {
#ifdef SVNR_CPU_AVX512
    {"avx512", has_avx512, SVNR_CPU_KERNELS_OF(cpu_avx512)},
#endif
#ifdef SVNR_CPU_AVX2
    {"avx2", has_avx2, SVNR_CPU_KERNELS_OF(cpu_avx2)},
#endif
    {"baseline", always, SVNR_CPU_KERNELS_OF(cpu_baseline)},
};

std::atomic<const CpuKernels*> chosen{nullptr};

const CpuKernels* find(const std::string& name) {
  for (const CpuKernels& kernels : kCompiled)
    if (name == kernels.name && kernels.supported()) return &kernels;
  throw std::invalid_argument("CPU instruction set '" + name + "' is not available here; use one of: " + cpu_isas());
}

const CpuKernels& kernels() {
  const CpuKernels* current = chosen.load(std::memory_order_acquire);
  if (current == nullptr) {
    const char* wanted = std::getenv("SVNR_FAST_CPU_ISA");
    if (wanted != nullptr && *wanted != '\0' && std::string(wanted) != "auto") {
      current = find(wanted);
    } else {
      for (const CpuKernels& k : kCompiled) {
        if (k.supported()) {
          current = &k;
          break;
        }
      }
    }
    chosen.store(current, std::memory_order_release);
  }
  return *current;
}

void check_image_shape(const char* op, std::int64_t batch, std::int64_t channels, std::int64_t pixels) {
  if (batch < 0 || channels < 0 || pixels < 0)
    throw std::invalid_argument(std::string(op) + ": negative sizes");
}

void check_table(const char* op, const Table& table) {
  if (table.data == nullptr || table.last < 1)
    throw std::invalid_argument(std::string(op) + ": the table needs at least 2 entries");
}

}  // namespace

void throw_unknown_dtype(const char* op, int dtype) {
  throw std::invalid_argument(std::string(op) + ": unknown dtype code " + std::to_string(dtype));
}

const char* cpu_isa() { return kernels().name; }

std::string cpu_isas() {
  std::string names;
  for (const CpuKernels& k : kCompiled)
    if (k.supported()) names += (names.empty() ? "" : ", ") + std::string(k.name);
  return names;
}

void set_cpu_isa(const std::string& name) { chosen.store(find(name), std::memory_order_release); }

void check_groupnorm_film_shape(const GroupNormFilmArgs& args) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("groupnorm_film: " + what); };
  if (args.batch < 1 || args.channels < 1 || args.pixels < 1)
    fail("h must have at least one image, channel and pixel");
  if (args.groups < 1 || args.channels % args.groups != 0)
    fail("groups (" + std::to_string(args.groups) + ") must divide the channels (" + std::to_string(args.channels) +
         ")");
  if (args.film && args.knots < 2) fail("the table needs at least 2 rows (knots), got " + std::to_string(args.knots));
  if (args.knots > (std::int64_t(1) << 30)) fail("the table has too many rows");
  if (args.dtype < kFloat32 || args.dtype > kFloat16) fail("unknown dtype code " + std::to_string(args.dtype));
}

void groupnorm_film_cpu(Pass pass, const GroupNormFilmArgs& args, int threads) {
  check_groupnorm_film_shape(args);
  kernels().groupnorm_film(pass, args, threads);
}

void lookup_cpu(const LookupArgs& args, int threads) {
  check_image_shape("lookup", args.batch, args.channels, args.pixels);
  if (args.op == Lookup::kTimeMap && args.channels < 1)
    throw std::invalid_argument("time_map: the variance needs at least one channel");
  check_table("lookup", args.table);
  kernels().lookup(args, threads);
}

void reverse_step_cpu(const ReverseStepArgs& args, int threads) {
  check_image_shape("reverse_step", args.batch, args.channels, args.pixels);
  check_table("reverse_step", args.table);
  kernels().reverse_step(args, threads);
}

void training_sample_cpu(const TrainingSampleArgs& args, int threads) {
  check_image_shape("training_sample", args.batch, args.channels, args.pixels);
  check_table("training_sample", args.table);
  kernels().training_sample(args, threads);
}

}  // namespace svnr
