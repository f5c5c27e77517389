// The CPU kernels of one instruction set. CMakeLists.txt compiles the kernel sources (*_cpu.cpp) once per
// instruction set, each time defining these entry points in namespace svnr::SVNR_CPU_NAMESPACE (cpu_baseline,
// cpu_avx2, cpu_avx512); cpu_dispatch.cpp checks the arguments and calls the set chosen at run time.
#pragma once

#include "svnr_kernels.h"

#define SVNR_DECLARE_CPU_KERNELS(isa)                                                \
  namespace isa {                                                                    \
  void groupnorm_film(Pass pass, const GroupNormFilmArgs& args, int threads);        \
  void lookup(const LookupArgs& args, int threads);                                  \
  void reverse_step(const ReverseStepArgs& args, int threads);                       \
  void training_sample(const TrainingSampleArgs& args, int threads);                 \
  }

namespace svnr {
SVNR_DECLARE_CPU_KERNELS(cpu_baseline)
SVNR_DECLARE_CPU_KERNELS(cpu_avx2)
SVNR_DECLARE_CPU_KERNELS(cpu_avx512)
}  // namespace svnr
