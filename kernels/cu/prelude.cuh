// Shared by every kernel file: mpopt prepends it before NVRTC compiles a module, so no file includes a
// header (NVRTC then needs no include path: half and bfloat16 conversions are written out below).
//
// Element type codes (must match `mpopt_kernels::Elem`): 0 f32, 1 f16, 2 bf16.
// Numerics: loads widen to f32 exactly, arithmetic is f32, and each store rounds once to nearest-even
// (`cvt.rn.f16.f32`, the instruction `__float2half_rn` emits; bf16 rounds the same way in integer code).
// This is the contract mpopt's CPU executor reproduces bit for bit.

typedef long long i64;
typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define T_F32 0
#define T_F16 1
#define T_BF16 2

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float b2f(u16 b) { return __uint_as_float(((u32)b) << 16); }
__device__ __forceinline__ u16 f2b(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);  // NaN stays NaN (quiet)
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

// Load element i of a float tensor of type t, widened to f32.
__device__ __forceinline__ float ldf(const void* p, i64 i, int t) {
    if (t == T_F32) return ((const float*)p)[i];
    if (t == T_F16) return h2f(((const u16*)p)[i]);
    return b2f(((const u16*)p)[i]);
}
// Store v as element i of a float tensor of type t, rounded once.
__device__ __forceinline__ void stf(void* p, i64 i, int t, float v) {
    if (t == T_F32) ((float*)p)[i] = v;
    else if (t == T_F16) ((u16*)p)[i] = f2h(v);
    else ((u16*)p)[i] = f2b(v);
}

// Up to MAXR dimensions (the host merges adjacent dimensions first). `shape` is the iteration space; each
// of the up to three operands has its own element strides into it (0 for a broadcast dimension).
#define MAXR 6
struct Strides3 {
    int rank;
    int pad;
    i64 shape[MAXR];
    i64 s0[MAXR];
    i64 s1[MAXR];
    i64 s2[MAXR];
    i64 base0;
    i64 base1;
    i64 base2;
};

__device__ __forceinline__ void offsets3(const Strides3& v, i64 i, i64* o0, i64* o1, i64* o2) {
    i64 a = v.base0, b = v.base1, c = v.base2;
    for (int d = v.rank - 1; d >= 0; --d) {
        i64 q = i % v.shape[d];
        i /= v.shape[d];
        a += q * v.s0[d];
        b += q * v.s1[d];
        c += q * v.s2[d];
    }
    *o0 = a;
    *o1 = b;
    *o2 = c;
}

#define GRID_STRIDE(i, n) \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)blockDim.x * gridDim.x)
