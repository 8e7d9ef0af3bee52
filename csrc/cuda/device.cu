// Driver probing. The runtime is linked statically, so importing the module never needs
// libcuda: on a machine without a (new enough) driver these report it instead of failing.
#include "../ops.h"

#include <cuda_runtime.h>

namespace gmp::cuda {

int device_count() {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
        cudaGetLastError(); // clear the sticky "no driver" error so later probes start clean
        return -1;
    }
    return count;
}

const char *driver_status() {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    cudaGetLastError();
    return err == cudaSuccess ? "ok" : cudaGetErrorString(err);
}

} // namespace gmp::cuda
