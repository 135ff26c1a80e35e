// Convolution helpers, pooling, BatchNormalization (inference) and Resize for NCHW tensors.

// im2col for one image: x [C, H, W] -> col [C·KH·KW, OH·OW] (raw elements of `es` bytes; padding is zero).
// A 1-D convolution runs with H = KH = OH = 1.
extern "C" __global__ void im2col(const void* x, void* col, i64 C, i64 H, i64 W, i64 KH, i64 KW, i64 OH, i64 OW,
                                  i64 sh, i64 sw, i64 ph, i64 pw, i64 dh, i64 dw, int es) {
    i64 n = C * KH * KW * OH * OW;
    GRID_STRIDE(i, n) {
        i64 ow = i % OW;
        i64 oh = (i / OW) % OH;
        i64 kw = (i / (OW * OH)) % KW;
        i64 kh = (i / (OW * OH * KW)) % KH;
        i64 c = i / (OW * OH * KW * KH);
        i64 ih = oh * sh - ph + kh * dh;
        i64 iw = ow * sw - pw + kw * dw;
        bool in = ih >= 0 && ih < H && iw >= 0 && iw < W;
        i64 src = (c * H + ih) * W + iw;
        switch (es) {
            case 2: ((u16*)col)[i] = in ? ((const u16*)x)[src] : (u16)0; break;
            default: ((u32*)col)[i] = in ? ((const u32*)x)[src] : 0u; break;
        }
    }
}

// MaxPool (mode 0) / AveragePool (mode 1) over [NC, H, W] -> [NC, OH, OW]. Average divides by the number
// of window taps inside the input, or, with count_include_pad, inside the padded input [-ph, EH) x [-pw, EW)
// (EH = H + end padding): taps that a ceil_mode window puts past the end padding never count.
extern "C" __global__ void pool2d(const void* x, void* y, i64 NC, i64 H, i64 W, i64 OH, i64 OW, i64 KH, i64 KW, i64 sh,
                                  i64 sw, i64 ph, i64 pw, i64 dh, i64 dw, i64 EH, i64 EW, int mode,
                                  int count_include_pad, int t) {
    i64 n = NC * OH * OW;
    GRID_STRIDE(i, n) {
        i64 ow = i % OW;
        i64 oh = (i / OW) % OH;
        i64 c = i / (OW * OH);
        float acc = mode == 0 ? -__int_as_float(0x7f800000) : 0.f;
        i64 cnt = 0, cnt_pad = 0;
        for (i64 kh = 0; kh < KH; ++kh) {
            i64 ih = oh * sh - ph + kh * dh;
            for (i64 kw = 0; kw < KW; ++kw) {
                i64 iw = ow * sw - pw + kw * dw;
                if (ih < 0 || ih >= H || iw < 0 || iw >= W) {
                    cnt_pad += (ih < EH && iw < EW);
                    continue;
                }
                float v = ldf(x, (c * H + ih) * W + iw, t);
                if (mode == 0) acc = (v != v || acc != acc) ? acc + v : fmaxf(acc, v);
                else acc += v;
                ++cnt;
                ++cnt_pad;
            }
        }
        if (mode == 1) {
            i64 div = count_include_pad ? cnt_pad : cnt;
            acc = div > 0 ? acc / (float)div : 0.f;
        }
        stf(y, i, t, acc);
    }
}

// BatchNormalization (inference): y = (x - mean) / sqrt(var + eps) * scale + bias over [N, C, HW];
// the four parameter vectors have C elements of type tp.
extern "C" __global__ void batch_norm(const void* x, const void* scale, const void* bias, const void* mean,
                                      const void* var, void* y, i64 N, i64 C, i64 HW, float eps, int t, int tp) {
    i64 n = N * C * HW;
    GRID_STRIDE(i, n) {
        i64 c = (i / HW) % C;
        float v = (ldf(x, i, t) - ldf(mean, c, tp)) / sqrtf(ldf(var, c, tp) + eps);
        stf(y, i, t, v * ldf(scale, c, tp) + ldf(bias, c, tp));
    }
}

// Resize of the last two axes of [NC, H, W] -> [NC, OH, OW]. mode 0 nearest, 1 linear (bilinear).
// ctm (coordinate transformation): 0 half_pixel, 1 asymmetric, 2 align_corners, 3 pytorch_half_pixel.
// nearest_mode: 0 round_prefer_floor, 1 round_prefer_ceil, 2 floor, 3 ceil. sh/sw are the scales
// (output / input); align_corners uses in_len·scale as the output length, as the ONNX reference does.
__device__ float resize_coord(i64 o, i64 in_len, i64 out_len, float scale, int ctm) {
    switch (ctm) {
        case 1: return (float)o / scale;
        case 2: {
            float ol = (float)in_len * scale;
            return ol <= 1.f ? 0.f : (float)o * (float)(in_len - 1) / (ol - 1.f);
        }
        case 3: return out_len > 1 ? ((float)o + 0.5f) / scale - 0.5f : 0.f;
        default: return ((float)o + 0.5f) / scale - 0.5f;
    }
}

__device__ i64 nearest_index(float c, int nearest_mode, i64 len) {
    float f;
    switch (nearest_mode) {
        case 0: f = (c - floorf(c) == 0.5f) ? floorf(c) : rintf(c); break;
        case 1: f = (c - floorf(c) == 0.5f) ? ceilf(c) : rintf(c); break;
        case 2: f = floorf(c); break;
        default: f = ceilf(c); break;
    }
    i64 k = (i64)f;
    if (k < 0) k = 0;
    if (k >= len) k = len - 1;
    return k;
}

extern "C" __global__ void resize2d(const void* x, void* y, i64 NC, i64 H, i64 W, i64 OH, i64 OW, float sh, float sw,
                                    int mode, int ctm, int nearest_mode, int t) {
    i64 n = NC * OH * OW;
    GRID_STRIDE(i, n) {
        i64 ow = i % OW;
        i64 oh = (i / OW) % OH;
        i64 c = i / (OW * OH);
        float ch = resize_coord(oh, H, OH, sh, ctm);
        float cw = resize_coord(ow, W, OW, sw, ctm);
        const i64 plane = c * H * W;
        if (mode == 0) {
            stf(y, i, t, ldf(x, plane + nearest_index(ch, nearest_mode, H) * W + nearest_index(cw, nearest_mode, W), t));
        } else {
            ch = fminf(fmaxf(ch, 0.f), (float)(H - 1));
            cw = fminf(fmaxf(cw, 0.f), (float)(W - 1));
            i64 h0 = (i64)floorf(ch), w0 = (i64)floorf(cw);
            i64 h1 = h0 + 1 < H ? h0 + 1 : H - 1, w1 = w0 + 1 < W ? w0 + 1 : W - 1;
            float fh = ch - (float)h0, fw = cw - (float)w0;
            float v00 = ldf(x, plane + h0 * W + w0, t), v01 = ldf(x, plane + h0 * W + w1, t);
            float v10 = ldf(x, plane + h1 * W + w0, t), v11 = ldf(x, plane + h1 * W + w1, t);
            float top = v00 + (v01 - v00) * fw, bot = v10 + (v11 - v10) * fw;
            stf(y, i, t, top + (bot - top) * fh);
        }
    }
}
