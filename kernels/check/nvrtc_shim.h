// Stand-ins for what NVRTC declares implicitly, so that clang can compile mpopt's kernels to PTX on a
// machine with no CUDA toolkit (kernels/check.sh). Only declarations: the PTX is checked, never run.
#define __device__ __attribute__((device))
#define __global__ __attribute__((global))
#define __shared__ __attribute__((shared))
#define __forceinline__ __inline__ __attribute__((always_inline))

struct __mpopt_dim3 {
    unsigned x, y, z;
};
extern const __device__ __mpopt_dim3 threadIdx, blockIdx, blockDim, gridDim;

__device__ inline float __uint_as_float(unsigned u) { return __builtin_bit_cast(float, u); }
__device__ inline unsigned __float_as_uint(float f) { return __builtin_bit_cast(unsigned, f); }
__device__ inline float __int_as_float(int u) { return __builtin_bit_cast(float, u); }

__device__ float expf(float);
__device__ float logf(float);
__device__ float sqrtf(float);
__device__ float tanhf(float);
__device__ float erff(float);
__device__ float fabsf(float);
__device__ float fminf(float, float);
__device__ float fmaxf(float, float);
__device__ float floorf(float);
__device__ float ceilf(float);
__device__ float rintf(float);
__device__ float sinf(float);
__device__ float cosf(float);
__device__ float powf(float, float);
