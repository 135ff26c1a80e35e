// Elementwise kernels: unary maps, broadcasting binary ops, comparisons, Where, and Cast between float types.
// Grid-stride loops; the host launches at most 65535 blocks of 256 threads.

// Unary op codes (mpopt_kernels::Unary).
__device__ float unary_op(float x, int op, float a, float b) {
    switch (op) {
        case 0: return x > 0.f ? x : 0.f;                                  // Relu
        case 1: return 1.f / (1.f + expf(-x));                              // Sigmoid
        case 2: return tanhf(x);                                            // Tanh
        case 3: return expf(x);                                             // Exp
        case 4: return logf(x);                                             // Log
        case 5: return sqrtf(x);                                            // Sqrt
        case 6: return -x;                                                  // Neg
        case 7: return fabsf(x);                                            // Abs
        case 8: return erff(x);                                             // Erf
        case 9: return 1.f / x;                                             // Reciprocal
        case 10: return x != x ? x : fminf(fmaxf(x, a), b);                 // Clip(min a, max b)
        case 11: return fminf(fmaxf(a * x + b, 0.f), 1.f);                  // HardSigmoid(alpha a, beta b)
        case 12: return x >= 0.f ? x : a * x;                               // LeakyRelu(alpha a)
        case 13: return 0.5f * x * (1.f + erff(x * 0.70710678118654752f)); // Gelu (exact)
        case 14: return x * fminf(fmaxf(x * (1.f / 6.f) + 0.5f, 0.f), 1.f); // HardSwish
        case 15: return floorf(x);                                          // Floor
        case 16: return ceilf(x);                                           // Ceil
        case 17: return sinf(x);                                            // Sin
        case 18: return cosf(x);                                            // Cos
        case 19: return x;                                                  // Identity (a rounding copy)
        default: return __int_as_float(0x7fc00000);
    }
}

extern "C" __global__ void unary(const void* x, void* y, i64 n, int tx, int ty, int op, float a, float b) {
    GRID_STRIDE(i, n) { stf(y, i, ty, unary_op(ldf(x, i, tx), op, a, b)); }
}

// Binary op codes (mpopt_kernels::Binary). `s` scales the second operand of AddScaled.
__device__ float binary_op(float x, float y, int op, float s) {
    switch (op) {
        case 0: return x + y;
        case 1: return x - y;
        case 2: return x * y;
        case 3: return x / y;
        case 4: return powf(x, y);
        case 5: return (x != x || y != y) ? __int_as_float(0x7fc00000) : fmaxf(x, y);
        case 6: return (x != x || y != y) ? __int_as_float(0x7fc00000) : fminf(x, y);
        case 7: return x + s * y;
        default: return __int_as_float(0x7fc00000);
    }
}

// y[o2] = a[o0] op b[o1] over the broadcast iteration space of `v`; all three share element type t.
extern "C" __global__ void binary(const void* a, const void* b, void* y, i64 n, Strides3 v, int t, int op, float s) {
    GRID_STRIDE(i, n) {
        i64 oa, ob, oy;
        offsets3(v, i, &oa, &ob, &oy);
        stf(y, oy, t, binary_op(ldf(a, oa, t), ldf(b, ob, t), op, s));
    }
}

// Comparison op codes (mpopt_kernels::Compare); the output is bool (one byte per element).
__device__ u8 compare_op(float x, float y, int op) {
    switch (op) {
        case 0: return x == y;
        case 1: return x < y;
        case 2: return x > y;
        case 3: return x <= y;
        case 4: return x >= y;
        default: return 0;
    }
}

extern "C" __global__ void compare(const void* a, const void* b, u8* y, i64 n, Strides3 v, int t, int op) {
    GRID_STRIDE(i, n) {
        i64 oa, ob, oy;
        offsets3(v, i, &oa, &ob, &oy);
        y[oy] = compare_op(ldf(a, oa, t), ldf(b, ob, t), op);
    }
}

// Comparison of signed integer tensors of `es` bytes (4: int32, 8: int64), exact (no float widening).
extern "C" __global__ void compare_int(const void* a, const void* b, u8* y, i64 n, Strides3 v, int op, int es) {
    GRID_STRIDE(i, n) {
        i64 oa, ob, oy;
        offsets3(v, i, &oa, &ob, &oy);
        i64 x = es == 4 ? (i64)((const int*)a)[oa] : ((const i64*)a)[oa];
        i64 z = es == 4 ? (i64)((const int*)b)[ob] : ((const i64*)b)[ob];
        u8 r = 0;
        switch (op) {
            case 0: r = x == z; break;
            case 1: r = x < z; break;
            case 2: r = x > z; break;
            case 3: r = x <= z; break;
            case 4: r = x >= z; break;
        }
        y[oy] = r;
    }
}

// Where(cond, a, b) for elements of `es` bytes (1, 2, 4 or 8): bits are copied, nothing is rounded.
// `v` carries the strides of cond (s0), a (s1) and the output (s2); `w` has the same shape and carries b's
// strides in s0.
extern "C" __global__ void where_sel(const u8* c, const void* a, const void* b, void* y, i64 n, Strides3 v, Strides3 w,
                                     int es) {
    GRID_STRIDE(i, n) {
        i64 oc, oa, oy, ob, unused0, unused1;
        offsets3(v, i, &oc, &oa, &oy);
        offsets3(w, i, &ob, &unused0, &unused1);
        const void* src = c[oc] ? a : b;
        i64 os = c[oc] ? oa : ob;
        switch (es) {
            case 1: ((u8*)y)[oy] = ((const u8*)src)[os]; break;
            case 2: ((u16*)y)[oy] = ((const u16*)src)[os]; break;
            case 4: ((u32*)y)[oy] = ((const u32*)src)[os]; break;
            default: ((u64*)y)[oy] = ((const u64*)src)[os]; break;
        }
    }
}

// Cast between the float types (codes as in the prelude): widen exactly, round once.
extern "C" __global__ void cast_float(const void* x, void* y, i64 n, int tx, int ty) {
    GRID_STRIDE(i, n) { stf(y, i, ty, ldf(x, i, tx)); }
}

// Cast from an integer or bool tensor (es bytes: 1 bool/uint8, 4 int32, 8 int64) to a float type: one
// rounding from the exact integer.
extern "C" __global__ void cast_int_float(const void* x, void* y, i64 n, int es, int ty) {
    GRID_STRIDE(i, n) {
        float v;
        if (es == 1) v = (float)((const u8*)x)[i];
        else if (es == 4) v = (float)((const int*)x)[i];
        else v = (float)((const i64*)x)[i];
        stf(y, i, ty, v);
    }
}

// Boolean Not.
extern "C" __global__ void not_bool(const u8* x, u8* y, i64 n) {
    GRID_STRIDE(i, n) { y[i] = !x[i]; }
}
