// Programmatic dependent launch: tilert launches Ultra's kernels with PDL (see
// crates/tilert/src/launch.rs), so a kernel's blocks may start while its predecessor in the
// stream still runs. Every kernel calls pdl_begin() before its first access to memory that an
// earlier kernel writes or reads (only weights may be touched before, e.g. prefetched); it waits
// for the predecessor to complete and flush, then lets the successor's blocks start (they wait
// in their own pdl_begin()). Launched without PDL, both instructions are no-ops.
#pragma once

__device__ __forceinline__ void pdl_begin() {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// For kernels that wait on other grids (the one-shot all-reduce spins until its peers arrive):
// waits for the predecessor like pdl_begin() but lets the successor start only when this grid
// completes — a successor launched early would hold SM slots in its own wait that the peers'
// all-reduce blocks (virtual ranks share the GPU) need to become resident.
__device__ __forceinline__ void pdl_wait_only() {
    asm volatile("griddepcontrol.wait;" ::: "memory");
}
