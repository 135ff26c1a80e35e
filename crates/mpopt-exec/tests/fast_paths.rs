//! The executor's fast kernels (integer and bool Casts, 2-D pooling, 2-D ConvTranspose col2im, constant Pad with merged trailing
//! dims, parallel broadcasting, nearest Resize, batch-1 Transpose) against brute-force loops written here,
//! on pseudo-random shapes and attributes. Sizes reach past the parallel chunk size (32768 elements), so the
//! multi-threaded paths run too.

use mpopt_exec::{Executor, RunOptions, Tensor, Value};
use mpopt_ir::text::parse_model;

mod common;
use common::{Rng, dims};

/// Runs the graph whose body lines are `body` over `%x` (and `%w`) and returns `%y`.
fn run1(body: &str, x: &Tensor, w: Option<&Tensor>) -> Tensor {
    let mut params = format!("%x: f32[{}]", dims(&x.shape));
    if let Some(w) = w {
        params += &format!(", %w: f32[{}]", dims(&w.shape));
    }
    let src = format!(
        "ir_version 8\nopset ai.onnx 19\n\ngraph @g({params}) -> (%y: f32[...]) {{\n{body}\n}}\n"
    );
    let m = parse_model(&src).unwrap_or_else(|e| panic!("{src}\n{e}"));
    let exec = Executor::new(&m).unwrap();
    let mut ins = vec![("x".to_string(), Value::Tensor(x.clone()))];
    if let Some(w) = w {
        ins.push(("w".to_string(), Value::Tensor(w.clone())));
    }
    let out = exec.run(ins, &RunOptions::default()).unwrap().outputs;
    out[0].1.tensor().unwrap().clone()
}

fn same_bits(got: &Tensor, want_shape: &[usize], want: &[f32], what: &str) {
    assert_eq!(got.shape, want_shape, "{what}: shape");
    let g = got.to_f32s().unwrap();
    for (i, (a, b)) in g.iter().zip(want).enumerate() {
        assert!(
            a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
            "{what}: element {i}: {a} != {b}"
        );
    }
}

#[test]
fn pooling_2d_matches_brute_force() {
    let mut rng = Rng(7);
    for case in 0..40 {
        let (n, c) = (1 + rng.below(2), 1 + rng.below(3));
        let (h, w) = (4 + rng.below(30), 4 + rng.below(30));
        let (k, s, d, p) = rng.window2(4);
        let ceil = rng.below(2);
        let include_pad = rng.below(2);
        let ek = [(k[0] - 1) * d[0] + 1, (k[1] - 1) * d[1] + 1];
        if h + p[0] + p[2] < ek[0] || w + p[1] + p[3] < ek[1] {
            continue;
        }
        let mut xs = rng.vals(n * c * h * w);
        if case % 5 == 0 {
            // A NaN must win every window that holds it.
            let i = rng.below(xs.len());
            xs[i] = f32::NAN;
        }
        let x = Tensor::f32(vec![n, c, h, w], xs.clone());
        let out_len = |len: usize, a: usize| {
            let span = len + p[a] + p[a + 2] - ek[a];
            let o = if ceil == 1 {
                span.div_ceil(s[a]) + 1
            } else {
                span / s[a] + 1
            };
            // With ceil_mode, a window must start inside the image or its begin padding.
            if ceil == 1 && (o - 1) * s[a] >= len + p[a] {
                o - 1
            } else {
                o
            }
        };
        let (oh, ow) = (out_len(h, 0), out_len(w, 1));
        let attrs = format!(
            "kernel_shape = [{}], strides = [{}], dilations = [{}], pads = [{}], ceil_mode = {ceil}",
            dims(&k),
            dims(&s),
            dims(&d),
            dims(&p)
        );
        for max in [true, false] {
            let mut want = Vec::new();
            for plane in 0..n * c {
                let xp = &xs[plane * h * w..(plane + 1) * h * w];
                for y in 0..oh {
                    for xo in 0..ow {
                        let (mut best, mut sum, mut cnt, mut cnt_pad) =
                            (f32::NEG_INFINITY, 0f32, 0, 0);
                        for i in 0..k[0] {
                            for j in 0..k[1] {
                                let iy = (y * s[0] + i * d[0]) as isize - p[0] as isize;
                                let ix = (xo * s[1] + j * d[1]) as isize - p[1] as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    if iy < (h + p[2]) as isize && ix < (w + p[3]) as isize {
                                        cnt_pad += 1;
                                    }
                                    continue;
                                }
                                let e = xp[iy as usize * w + ix as usize];
                                if e > best || e.is_nan() || best.is_nan() {
                                    best = if best.is_nan() { best } else { e };
                                }
                                sum += e;
                                cnt += 1;
                                cnt_pad += 1;
                            }
                        }
                        let div = if include_pad == 1 { cnt_pad } else { cnt };
                        want.push(if max {
                            best
                        } else if div == 0 {
                            0.0
                        } else {
                            sum / div as f32
                        });
                    }
                }
            }
            let body = if max {
                format!("  %y = MaxPool(%x) {{{attrs}}}")
            } else {
                format!("  %y = AveragePool(%x) {{{attrs}, count_include_pad = {include_pad}}}")
            };
            let got = run1(&body, &x, None);
            same_bits(
                &got,
                &[n, c, oh, ow],
                &want,
                &format!("case {case}: {body}"),
            );
        }
    }
}

#[test]
fn conv_transpose_2d_matches_brute_force() {
    let mut rng = Rng(11);
    for case in 0..20 {
        let (n, g) = (1 + rng.below(2), 1 + rng.below(2));
        let (cg, mg) = (1 + rng.below(3), 1 + rng.below(3));
        let (h, w) = (1 + rng.below(9), 1 + rng.below(9));
        let (k, s, d, p) = rng.window2(3);
        let full = |len: usize, a: usize| s[a] * (len - 1) + (k[a] - 1) * d[a] + 1;
        let (oh, ow) = (full(h, 0) - p[0] - p[2], full(w, 1) - p[1] - p[3]);
        let c = cg * g;
        let m = mg * g;
        let xs = rng.vals(n * c * h * w);
        let ws = rng.vals(c * mg * k[0] * k[1]);
        let mut want = vec![0f64; n * m * oh * ow];
        for b in 0..n {
            for ci in 0..c {
                let gi = ci / cg;
                for mi in 0..mg {
                    for iy in 0..h {
                        for ix in 0..w {
                            for i in 0..k[0] {
                                for j in 0..k[1] {
                                    let oy = (iy * s[0] + i * d[0]) as isize - p[0] as isize;
                                    let ox = (ix * s[1] + j * d[1]) as isize - p[1] as isize;
                                    if oy < 0 || ox < 0 || oy >= oh as isize || ox >= ow as isize {
                                        continue;
                                    }
                                    let xv = xs[((b * c + ci) * h + iy) * w + ix] as f64;
                                    let wv = ws[((ci * mg + mi) * k[0] + i) * k[1] + j] as f64;
                                    let o = ((b * m + gi * mg + mi) * oh + oy as usize) * ow
                                        + ox as usize;
                                    want[o] += xv * wv;
                                }
                            }
                        }
                    }
                }
            }
        }
        let x = Tensor::f32(vec![n, c, h, w], xs);
        let wt = Tensor::f32(vec![c, mg, k[0], k[1]], ws);
        let body = format!(
            "  %y = ConvTranspose(%x, %w) {{group = {g}, strides = [{}], dilations = [{}], pads = [{}]}}",
            dims(&s),
            dims(&d),
            dims(&p)
        );
        let got = run1(&body, &x, Some(&wt));
        assert_eq!(got.shape, vec![n, m, oh, ow], "case {case}: {body}");
        for (i, (a, b)) in got.to_f32s().unwrap().iter().zip(&want).enumerate() {
            assert!(
                (*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "case {case}: {body}: element {i}: {a} != {b}"
            );
        }
    }
}

#[test]
fn batched_small_plane_conv_matches_brute_force() {
    // Batches of 1-D frames run as one product over the whole batch; 2-D cases check the per-image path.
    let mut rng = Rng(23);
    for case in 0..20 {
        let (n, c, m) = (2 + rng.below(5), 1 + rng.below(9), 1 + rng.below(9));
        let one_d = case % 2 == 0;
        let (h, w) = if one_d {
            (1, 2 + rng.below(20))
        } else {
            (1 + rng.below(7), 1 + rng.below(7))
        };
        let (mut k, mut s, mut d, mut p) = rng.window2(3);
        if one_d {
            (k[0], s[0], d[0], p[0], p[2]) = (1, 1, 1, 0, 0);
        }
        let ek = |a: usize| (k[a] - 1) * d[a] + 1;
        let (hp, wp) = (h + p[0] + p[2], w + p[1] + p[3]);
        if hp < ek(0) || wp < ek(1) {
            continue;
        }
        let (oh, ow) = ((hp - ek(0)) / s[0] + 1, (wp - ek(1)) / s[1] + 1);
        let xs = rng.vals(n * c * h * w);
        let ws = rng.vals(m * c * k[0] * k[1]);
        let mut want = vec![0f64; n * m * oh * ow];
        for b in 0..n {
            for o in 0..m {
                for y in 0..oh {
                    for x in 0..ow {
                        let mut acc = 0f64;
                        for ci in 0..c {
                            for i in 0..k[0] {
                                for j in 0..k[1] {
                                    let iy = (y * s[0] + i * d[0]) as isize - p[0] as isize;
                                    let ix = (x * s[1] + j * d[1]) as isize - p[1] as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let xv = xs[((b * c + ci) * h + iy as usize) * w + ix as usize];
                                    let wv = ws[((o * c + ci) * k[0] + i) * k[1] + j];
                                    acc += xv as f64 * wv as f64;
                                }
                            }
                        }
                        want[((b * m + o) * oh + y) * ow + x] = acc;
                    }
                }
            }
        }
        let (x, wt, shape) = if one_d {
            (
                Tensor::f32(vec![n, c, w], xs),
                Tensor::f32(vec![m, c, k[1]], ws),
                vec![n, m, ow],
            )
        } else {
            (
                Tensor::f32(vec![n, c, h, w], xs),
                Tensor::f32(vec![m, c, k[0], k[1]], ws),
                vec![n, m, oh, ow],
            )
        };
        let body = if one_d {
            format!(
                "  %y = Conv(%x, %w) {{strides = [{}], dilations = [{}], pads = [{}, {}]}}",
                s[1], d[1], p[1], p[3]
            )
        } else {
            format!(
                "  %y = Conv(%x, %w) {{strides = [{}], dilations = [{}], pads = [{}]}}",
                dims(&s),
                dims(&d),
                dims(&p)
            )
        };
        let got = run1(&body, &x, Some(&wt));
        assert_eq!(got.shape, shape, "case {case}: {body}");
        for (i, (a, b)) in got.to_f32s().unwrap().iter().zip(&want).enumerate() {
            assert!(
                (*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "case {case} element {i}: {a} != {b}: {body}"
            );
        }
    }
}

#[test]
fn pad_matches_brute_force() {
    let mut rng = Rng(5);
    for case in 0..30 {
        let rank = 2 + rng.below(3);
        let shape: Vec<usize> = (0..rank).map(|_| 1 + rng.below(12)).collect();
        // Often pad only leading dims, so trailing dims merge into one block copy.
        let padded = 1 + rng.below(rank);
        let mut pads = vec![0usize; 2 * rank];
        for a in 0..padded {
            pads[a] = rng.below(3);
            pads[a + rank] = rng.below(3);
        }
        let mode = ["constant", "edge", "reflect", "wrap"][rng.below(4)];
        if mode == "reflect" && (0..rank).any(|a| pads[a].max(pads[a + rank]) >= shape[a]) {
            continue;
        }
        let xs = rng.vals(shape.iter().product());
        let out: Vec<usize> = (0..rank)
            .map(|a| shape[a] + pads[a] + pads[a + rank])
            .collect();
        let total: usize = out.iter().product();
        let mut want = Vec::with_capacity(total);
        let mut idx = vec![0usize; rank];
        for _ in 0..total {
            let mut off = Some(0usize);
            for a in 0..rank {
                let len = shape[a] as isize;
                let mut i = idx[a] as isize - pads[a] as isize;
                if i < 0 || i >= len {
                    i = match mode {
                        "edge" => i.clamp(0, len - 1),
                        "wrap" => i.rem_euclid(len),
                        "reflect" if i < 0 => -i,
                        "reflect" => 2 * (len - 1) - i,
                        _ => -1,
                    };
                }
                off = off.filter(|_| i >= 0).map(|o| o * shape[a] + i as usize);
            }
            want.push(off.map_or(1.5, |o| xs[o]));
            for a in (0..rank).rev() {
                idx[a] += 1;
                if idx[a] < out[a] {
                    break;
                }
                idx[a] = 0;
            }
        }
        let x = Tensor::f32(shape.clone(), xs);
        let pads_s = dims(&pads);
        let body = format!(
            "  %p = const i64[{}] [{pads_s}]\n  %v = const f32[] [1.5]\n  %y = Pad(%x, %p, %v) {{mode = \"{mode}\"}}",
            2 * rank
        );
        let got = run1(&body, &x, None);
        same_bits(
            &got,
            &out,
            &want,
            &format!("case {case}: {mode} {pads_s} on {shape:?}"),
        );
    }
}

#[test]
fn pad_of_an_empty_tensor_is_all_fill() {
    for (shape, pads, out) in [
        (vec![2, 0, 3], "1,0,0,1,0,0", vec![4, 0, 3]),
        (vec![2, 0], "0,1,0,2", vec![2, 3]),
    ] {
        let x = Tensor::f32(shape.clone(), Vec::new());
        let body = format!(
            "  %p = const i64[{}] [{pads}]\n  %v = const f32[] [1.5]\n  %y = Pad(%x, %p, %v)",
            2 * shape.len()
        );
        let got = run1(&body, &x, None);
        let n = out.iter().product();
        same_bits(
            &got,
            &out,
            &vec![1.5; n],
            &format!("Pad {pads} of {shape:?}"),
        );
    }
}

#[test]
fn broadcast_binary_matches_brute_force() {
    let mut rng = Rng(3);
    // Large enough for several parallel chunks; every pattern of broadcast dims over rank 4.
    let full = [3usize, 40, 24, 20];
    for mask in 0..16usize {
        let bshape: Vec<usize> = (0..4)
            .map(|a| if mask >> a & 1 == 1 { 1 } else { full[a] })
            .collect();
        let n: usize = full.iter().product();
        let xs = rng.vals(n);
        let bs = rng.vals(bshape.iter().product());
        let mut want = Vec::with_capacity(n);
        let mut idx = [0usize; 4];
        for _ in 0..n {
            let mut off = 0;
            for a in 0..4 {
                off = off * bshape[a] + if bshape[a] == 1 { 0 } else { idx[a] };
            }
            let i = ((idx[0] * full[1] + idx[1]) * full[2] + idx[2]) * full[3] + idx[3];
            want.push(xs[i] - bs[off]);
            for a in (0..4).rev() {
                idx[a] += 1;
                if idx[a] < full[a] {
                    break;
                }
                idx[a] = 0;
            }
        }
        let x = Tensor::f32(full.to_vec(), xs);
        let w = Tensor::f32(bshape.clone(), bs);
        let got = run1("  %y = Sub(%x, %w)", &x, Some(&w));
        same_bits(&got, &full, &want, &format!("x - w{bshape:?}"));
    }
}

#[test]
fn nearest_resize_and_transpose_match_brute_force() {
    let mut rng = Rng(9);
    let (n, c, h, w) = (1, 24, 23, 42);
    let xs = rng.vals(n * c * h * w);
    let x = Tensor::f32(vec![n, c, h, w], xs.clone());
    // Nearest, asymmetric, floor, x4 (ppocrv4_det's upsampling): out[y][x] = in[y / 4][x / 4].
    let body = "  %s = const f32[4] [1, 1, 4, 4]\n  %y = Resize(%x, _, %s) {mode = \"nearest\", \
                coordinate_transformation_mode = \"asymmetric\", nearest_mode = \"floor\"}";
    let got = run1(body, &x, None);
    let (oh, ow) = (h * 4, w * 4);
    let mut want = Vec::new();
    for p in 0..n * c {
        for y in 0..oh {
            for xo in 0..ow {
                want.push(xs[(p * h + y / 4) * w + xo / 4]);
            }
        }
    }
    same_bits(&got, &[n, c, oh, ow], &want, "Resize nearest x4");
    // NCHW -> NHWC and back on a batch-1 tensor larger than one parallel chunk.
    let big = Tensor::f32(vec![1, c, oh, ow], want.clone());
    let nhwc = run1("  %y = Transpose(%x) {perm = [0, 2, 3, 1]}", &big, None);
    let mut want_t = Vec::new();
    for y in 0..oh {
        for xo in 0..ow {
            for ch in 0..c {
                want_t.push(want[(ch * oh + y) * ow + xo]);
            }
        }
    }
    same_bits(&nhwc, &[1, oh, ow, c], &want_t, "Transpose to NHWC");
    let back = run1("  %y = Transpose(%x) {perm = [0, 3, 1, 2]}", &nhwc, None);
    same_bits(&back, &[1, c, oh, ow], &want, "Transpose back to NCHW");
}

/// Integer and bool casts take `as` paths by source type (bool, u64 through i128, the rest through i64);
/// each must give what converting one element at a time through i128 gives (the general path).
#[test]
fn integer_and_bool_casts_match_the_wide_path() {
    use mpopt_exec::{Data, cast_tensor};
    use mpopt_ir::DType;
    let targets = [
        DType::F32,
        DType::F64,
        DType::F16,
        DType::BF16,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::U8,
        DType::U16,
        DType::U32,
        DType::U64,
        DType::Bool,
    ];
    let wide: Vec<i128> = vec![
        0,
        1,
        -1,
        127,
        128,
        -129,
        255,
        256,
        65_504,
        65_520,
        2049,
        (1 << 24) + 1,
        i64::MAX as i128,
        i64::MIN as i128,
        u64::MAX as i128,
        (1u64 << 63) as i128 + 12_345,
    ];
    let n = wide.len();
    let sources: Vec<(Data, Vec<i128>)> = vec![
        (
            Data::Bool(wide.iter().map(|&x| x & 1 == 1).collect()),
            wide.iter().map(|&x| x & 1).collect(),
        ),
        (
            Data::U64(wide.iter().map(|&x| x as u64).collect()),
            wide.iter().map(|&x| x as u64 as i128).collect(),
        ),
        (
            Data::I64(wide.iter().map(|&x| x as i64).collect()),
            wide.iter().map(|&x| x as i64 as i128).collect(),
        ),
        (
            Data::I32(wide.iter().map(|&x| x as i32).collect()),
            wide.iter().map(|&x| x as i32 as i128).collect(),
        ),
        (
            Data::U8(wide.iter().map(|&x| x as u8).collect()),
            wide.iter().map(|&x| x as u8 as i128).collect(),
        ),
    ];
    for (data, values) in sources {
        let from = data.dtype();
        let t = Tensor::new(vec![n], data);
        for to in targets {
            let got = cast_tensor(&t, to).unwrap();
            let want: Vec<String> = values
                .iter()
                .map(|&x| match to {
                    DType::F32 => format!("{:?}", (x as f32).to_bits()),
                    DType::F64 => format!("{:?}", (x as f64).to_bits()),
                    DType::F16 => format!("{:?}", half::f16::from_f64(x as f64).to_bits()),
                    DType::BF16 => format!("{:?}", half::bf16::from_f64(x as f64).to_bits()),
                    DType::I8 => (x as i8).to_string(),
                    DType::I16 => (x as i16).to_string(),
                    DType::I32 => (x as i32).to_string(),
                    DType::I64 => (x as i64).to_string(),
                    DType::U8 => (x as u8).to_string(),
                    DType::U16 => (x as u16).to_string(),
                    DType::U32 => (x as u32).to_string(),
                    DType::U64 => (x as u64).to_string(),
                    _ => (x != 0).to_string(),
                })
                .collect();
            let shown: Vec<String> = match &got.data {
                Data::F32(v) => v.iter().map(|x| format!("{:?}", x.to_bits())).collect(),
                Data::F64(v) => v.iter().map(|x| format!("{:?}", x.to_bits())).collect(),
                Data::F16(v) => v.iter().map(|x| format!("{:?}", x.to_bits())).collect(),
                Data::BF16(v) => v.iter().map(|x| format!("{:?}", x.to_bits())).collect(),
                Data::Bool(v) => v.iter().map(|x| x.to_string()).collect(),
                Data::U64(v) => v.iter().map(|x| x.to_string()).collect(),
                _ => got
                    .to_i64s()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_string())
                    .collect(),
            };
            assert_eq!(shown, want, "{from} -> {to}");
        }
    }
}
