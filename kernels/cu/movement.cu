// Data movement: strided copies (Transpose, Slice, Concat, Expand, Pad's interior), Gather, and fills.
// Elements are moved as raw bits of `es` bytes (1, 2, 4 or 8), so f16 and bf16 pass through unrounded.

__device__ __forceinline__ void move_elem(const void* src, i64 os, void* dst, i64 od, int es) {
    switch (es) {
        case 1: ((u8*)dst)[od] = ((const u8*)src)[os]; break;
        case 2: ((u16*)dst)[od] = ((const u16*)src)[os]; break;
        case 4: ((u32*)dst)[od] = ((const u32*)src)[os]; break;
        default: ((u64*)dst)[od] = ((const u64*)src)[os]; break;
    }
}

// For every index of the iteration space of `v`: dst[base1 + i·s1] = src[base0 + i·s0] (s2 unused).
extern "C" __global__ void strided_copy(const void* src, void* dst, i64 n, Strides3 v, int es) {
    GRID_STRIDE(i, n) {
        i64 os, od, unused;
        offsets3(v, i, &os, &od, &unused);
        move_elem(src, os, dst, od, es);
    }
}

// Gather along one axis: src viewed as [outer, axis_len, inner], indices (int64, negatives count from the end,
// out-of-range ones are clamped: the host checks indices it can see) and dst as [outer, nidx, inner].
extern "C" __global__ void gather(const void* src, const i64* idx, void* dst, i64 outer, i64 axis_len, i64 nidx,
                                  i64 inner, int es) {
    i64 n = outer * nidx * inner;
    GRID_STRIDE(i, n) {
        i64 in = i % inner;
        i64 j = (i / inner) % nidx;
        i64 o = i / (inner * nidx);
        i64 k = idx[j];
        if (k < 0) k += axis_len;
        if (k < 0) k = 0;
        if (k >= axis_len) k = axis_len - 1;
        move_elem(src, (o * axis_len + k) * inner + in, dst, i, es);
    }
}

// dst[i] = the `es`-byte pattern held in the low bytes of `bits`.
extern "C" __global__ void fill(void* dst, i64 n, u64 bits, int es) {
    GRID_STRIDE(i, n) {
        switch (es) {
            case 1: ((u8*)dst)[i] = (u8)bits; break;
            case 2: ((u16*)dst)[i] = (u16)bits; break;
            case 4: ((u32*)dst)[i] = (u32)bits; break;
            default: ((u64*)dst)[i] = bits; break;
        }
    }
}

// Pad in mode edge (mode 0) or reflect (mode 1): every output element reads one input element. `v` carries
// the output shape in `shape`, the input's element strides in s0, the input's dimensions in s1 and the
// leading pads in s2 (built without merging dimensions).
extern "C" __global__ void pad_index(const void* src, void* dst, i64 n, Strides3 v, int mode, int es) {
    GRID_STRIDE(i, n) {
        i64 rem = i, off = 0;
        for (int d = v.rank - 1; d >= 0; --d) {
            i64 o = rem % v.shape[d];
            rem /= v.shape[d];
            i64 len = v.s1[d];
            i64 c = o - v.s2[d];
            if (mode == 0 || len == 1) {
                c = c < 0 ? 0 : (c >= len ? len - 1 : c);
            } else {
                i64 period = 2 * (len - 1);
                c = c % period;
                if (c < 0) c += period;
                if (c >= len) c = period - c;
            }
            off += c * v.s0[d];
        }
        move_elem(src, off, dst, i, es);
    }
}
