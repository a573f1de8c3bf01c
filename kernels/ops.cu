// The dense ops of a decoder step (see crates/tilert/src/ops.rs for the contract of each kernel).
#include <cuda_bf16.h>
#include <stdint.h>

extern "C" __global__ void ops_placeholder(float* x) {
    if (x) x[threadIdx.x] = 0.f;
}
