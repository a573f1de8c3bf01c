// Scalar math shared by op families (IEEE, no fast math).
#pragma once

// The logistic function as the CPU definitions compute it (expf, one IEEE division).
__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }
