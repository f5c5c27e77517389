// What the CUDA runtime this module was linked with reports. Querying the runtime version does not
// create a context, so `svnr info` can call it on machines without a GPU driver.
#include <cuda_runtime.h>

#include "svnr_kernels.h"

namespace svnr {

int cuda_runtime_version() {
  int version = 0;
  return cudaRuntimeGetVersion(&version) == cudaSuccess ? version : -1;
}

int cuda_driver_version() {
  int version = 0;
  return cudaDriverGetVersion(&version) == cudaSuccess ? version : -1;
}

}  // namespace svnr
