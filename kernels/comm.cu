// Communication kernels: the one-shot all-reduce over peer memory (common/allreduce.cuh) for bf16
// and f32 partials, one block per block slot.
//
// Launched by crates/comm/src/symmetric.rs (`SymmetricGroup::all_reduce`), one launch per rank on
// that rank's stream; the ABI is common/comm_abi.cuh (mirrored by crates/comm/src/abi.rs). The
// kernels never trigger their dependents early (pdl_wait_only): with ULTRA_PDL=1 the next kernel
// is launched with programmatic serialization, and its CTAs, resident early and waiting, could
// take the SM slots that a peer rank's all-reduce blocks need (virtual ranks) while this grid
// spins for that peer.
#include <cuda_bf16.h>
#include <stdint.h>

#include "common/allreduce.cuh"
#include "common/comm_abi.cuh"
#include "common/pdl.cuh"

extern "C" __global__ void __launch_bounds__(COMM_MAX_THREADS)
    comm_allreduce_bf16(const AllReduceArgs a) {
    pdl_wait_only();
    const uint32_t e = comm_kernel_epoch(a);
    comm_allreduce_block<__nv_bfloat16>(a, blockIdx.x, e);
    comm_kernel_done(a, e);
}

extern "C" __global__ void __launch_bounds__(COMM_MAX_THREADS)
    comm_allreduce_f32(const AllReduceArgs a) {
    pdl_wait_only();
    const uint32_t e = comm_kernel_epoch(a);
    comm_allreduce_block<float>(a, blockIdx.x, e);
    comm_kernel_done(a, e);
}
