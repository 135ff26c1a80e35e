// Reductions and the row-wise ops (Softmax, LayerNormalization), on a tensor viewed as [outer, r, inner]:
// each output element (o, k) reduces x[o, 0..r, k]. One block of 256 threads per output element; partial
// sums in f32, combined in shared memory. The result is rounded once to the output type.

#define RBLOCK 256

// Block-wide reduction of one float per thread: op 0 sum, 1 max, 2 min. Every thread gets the result.
__device__ float block_reduce(float v, int op) {
    __shared__ float buf[RBLOCK];
    __shared__ float result;
    buf[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            float a = buf[threadIdx.x], b = buf[threadIdx.x + s];
            if (op == 0) buf[threadIdx.x] = a + b;
            else if (op == 1) buf[threadIdx.x] = (a != a || b != b) ? a + b : fmaxf(a, b);
            else buf[threadIdx.x] = (a != a || b != b) ? a + b : fminf(a, b);
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) result = buf[0];
    __syncthreads();
    float r = result;
    __syncthreads();
    return r;
}

// Reduce op codes (mpopt_kernels::Reduce): 0 sum, 1 mean, 2 max, 3 min, 4 sum of squares, 5 L1, 6 L2.
extern "C" __global__ void reduce(const void* x, void* y, i64 outer, i64 r, i64 inner, int tx, int ty, int op) {
    i64 out = (i64)blockIdx.x + (i64)blockIdx.y * gridDim.x;
    if (out >= outer * inner) return;
    i64 o = out / inner, k = out % inner;
    const i64 base = o * r * inner + k;
    int comb = (op == 2) ? 1 : (op == 3) ? 2 : 0;
    float acc = comb == 1 ? -__int_as_float(0x7f800000) : comb == 2 ? __int_as_float(0x7f800000) : 0.f;
    for (i64 j = threadIdx.x; j < r; j += blockDim.x) {
        float v = ldf(x, base + j * inner, tx);
        if (op == 4 || op == 6) v = v * v;
        else if (op == 5) v = fabsf(v);
        if (comb == 0) acc += v;
        else if (v != v || acc != acc) acc = acc + v;
        else acc = comb == 1 ? fmaxf(acc, v) : fminf(acc, v);
    }
    float tot = block_reduce(acc, comb);
    if (threadIdx.x == 0) {
        if (op == 1) tot = tot / (float)r;
        if (op == 6) tot = sqrtf(tot);
        stf(y, out, ty, tot);
    }
}

// Softmax over r: y = exp(x - max) / sum(exp(x - max)), computed in f32 (op 0), or LogSoftmax (op 1).
extern "C" __global__ void softmax(const void* x, void* y, i64 outer, i64 r, i64 inner, int t, int op) {
    i64 out = (i64)blockIdx.x + (i64)blockIdx.y * gridDim.x;
    if (out >= outer * inner) return;
    i64 o = out / inner, k = out % inner;
    const i64 base = o * r * inner + k;
    float m = -__int_as_float(0x7f800000);
    for (i64 j = threadIdx.x; j < r; j += blockDim.x) {
        float v = ldf(x, base + j * inner, t);
        m = (v != v || m != m) ? m + v : fmaxf(m, v);
    }
    m = block_reduce(m, 1);
    float s = 0.f;
    for (i64 j = threadIdx.x; j < r; j += blockDim.x) s += expf(ldf(x, base + j * inner, t) - m);
    s = block_reduce(s, 0);
    for (i64 j = threadIdx.x; j < r; j += blockDim.x) {
        float e = ldf(x, base + j * inner, t) - m;
        stf(y, base + j * inner, t, op == 0 ? expf(e) / s : e - logf(s));
    }
}

// LayerNormalization over the last r elements of each of `outer` rows: y = (x - mean) / sqrt(var + eps)
// * scale + bias (bias may be null); scale and bias have r elements of type tp; two passes over the row.
extern "C" __global__ void layer_norm(const void* x, const void* scale, const void* bias, void* y, i64 outer, i64 r,
                                      float eps, int t, int tp) {
    i64 o = (i64)blockIdx.x + (i64)blockIdx.y * gridDim.x;
    if (o >= outer) return;
    const i64 base = o * r;
    float s = 0.f;
    for (i64 j = threadIdx.x; j < r; j += blockDim.x) s += ldf(x, base + j, t);
    float mean = block_reduce(s, 0) / (float)r;
    float q = 0.f;
    for (i64 j = threadIdx.x; j < r; j += blockDim.x) {
        float d = ldf(x, base + j, t) - mean;
        q += d * d;
    }
    float var = block_reduce(q, 0) / (float)r;
    float inv = 1.f / sqrtf(var + eps);
    for (i64 j = threadIdx.x; j < r; j += blockDim.x) {
        float v = (ldf(x, base + j, t) - mean) * inv * ldf(scale, j, tp);
        if (bias) v += ldf(bias, j, tp);
        stf(y, base + j, t, v);
    }
}
