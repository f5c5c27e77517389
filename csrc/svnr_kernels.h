// Entry points the pybind11 module exposes. Tensors cross the boundary as raw device or host pointers
// plus sizes: the module links neither libtorch nor torch's CUDA headers, so it builds wherever a C++
// compiler (and optionally nvcc) exists and is independent of the installed torch's ABI. The Python side
// (svnr_fast/ops.py) allocates every tensor and passes the current CUDA stream.
#pragma once

#include <cstdint>

namespace svnr {

#ifdef SVNR_WITH_CUDA
int cuda_runtime_version();
int cuda_driver_version();
#endif

}  // namespace svnr
