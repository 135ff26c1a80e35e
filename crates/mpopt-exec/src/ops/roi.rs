//! RoiAlign (opsets 10, 16): for every region of interest, `output_height x output_width` bins, each the
//! average (or the maximum of weighted corners, as onnxruntime and the reference define `max`) of a grid of
//! bilinear samples. `half_pixel` (the default from opset 16) shifts the box by half a pixel and does not
//! force it to at least one pixel; `output_half_pixel` (opset 10's only behaviour) does. Computed in f32.

use super::{Ctx, R};
use crate::{Tensor, Value};

/// One bilinear sample: the four corner offsets in a plane and their weights.
#[derive(Clone, Copy, Default)]
struct Sample {
    pos: [usize; 4],
    w: [f32; 4],
}

/// The sample at (y, x) of an `h x w` plane; all weights 0 outside [-1, h] x [-1, w].
fn sample(h: usize, w: usize, y: f32, x: f32) -> Sample {
    if y < -1.0 || y > h as f32 || x < -1.0 || x > w as f32 {
        return Sample::default();
    }
    let (mut y, mut x) = (y.max(0.0), x.max(0.0));
    let (mut y0, mut x0) = (y as usize, x as usize);
    let y1 = if y0 >= h - 1 {
        y0 = h - 1;
        y = y0 as f32;
        y0
    } else {
        y0 + 1
    };
    let x1 = if x0 >= w - 1 {
        x0 = w - 1;
        x = x0 as f32;
        x0
    } else {
        x0 + 1
    };
    let (ly, lx) = (y - y0 as f32, x - x0 as f32);
    let (hy, hx) = (1.0 - ly, 1.0 - lx);
    Sample {
        pos: [y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1],
        w: [hy * hx, hy * lx, ly * hx, ly * lx],
    }
}

/// The most bilinear samples one region may take (2^26): real models take thousands.
const MAX_SAMPLES: usize = 1 << 26;

pub(crate) fn roi_align(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (x, rois, idx) = (ctx.t(0)?, ctx.t(1)?, ctx.t(2)?);
    let [n, c, h, w] = x.shape[..] else {
        return Err(format!("X must be N x C x H x W, got {:?}", x.shape));
    };
    if h == 0 || w == 0 {
        return Err(format!("X has an empty plane: {:?}", x.shape));
    }
    let [k, 4] = rois.shape[..] else {
        return Err(format!("rois must be num_rois x 4, got {:?}", rois.shape));
    };
    let batch = idx.to_i64s()?;
    if batch.len() != k {
        return Err(format!(
            "batch_indices has {} entries for {k} rois",
            batch.len()
        ));
    }
    let half_pixel = match ctx.as_str("coordinate_transformation_mode") {
        Some(m) => match m.as_str() {
            "half_pixel" => true,
            "output_half_pixel" => false,
            other => return Err(format!("unknown coordinate_transformation_mode '{other}'")),
        },
        None => ctx.opset >= 16,
    };
    let max_mode = match ctx.as_str("mode").as_deref() {
        None | Some("avg") => false,
        Some("max") => true,
        Some(other) => return Err(format!("unknown mode '{other}'")),
    };
    let (oh, ow) = (
        ctx.ai("output_height", 1).max(1) as usize,
        ctx.ai("output_width", 1).max(1) as usize,
    );
    let ratio = ctx.ai("sampling_ratio", 0);
    let scale = ctx.af("spatial_scale", 1.0);
    // an attribute error, not a run that allocates and samples for hours
    if oh.checked_mul(ow).is_none_or(|bins| bins > MAX_SAMPLES) {
        return Err(format!(
            "output_height {oh} x output_width {ow}: more than 2^26 bins per region"
        ));
    }
    let (xv, rv) = (x.to_f32s()?, rois.to_f32s()?);
    let mut out = vec![0f32; k * c * oh * ow];
    let offset = if half_pixel { 0.5 } else { 0.0 };
    for r in 0..k {
        let b = usize::try_from(batch[r])
            .ok()
            .filter(|&b| b < n)
            .ok_or_else(|| format!("batch index {} of roi {r} is not in [0, {n})", batch[r]))?;
        let bx = &rv[r * 4..][..4];
        let (x0, y0) = (bx[0] * scale - offset, bx[1] * scale - offset);
        let (mut rw, mut rh) = (bx[2] * scale - offset - x0, bx[3] * scale - offset - y0);
        if !half_pixel {
            rw = rw.max(1.0);
            rh = rh.max(1.0);
        }
        let (bin_h, bin_w) = (rh / oh as f32, rw / ow as f32);
        let grid = |extent: f32, bins: usize| -> usize {
            if ratio > 0 {
                ratio as usize
            } else {
                (extent / bins as f32).ceil().max(0.0) as usize
            }
        };
        let (gh, gw) = (grid(rh, oh), grid(rw, ow));
        if (oh * ow)
            .checked_mul(gh)
            .and_then(|v| v.checked_mul(gw))
            .is_none_or(|v| v > MAX_SAMPLES)
        {
            return Err(format!(
                "roi {r}: {oh} x {ow} bins of {gh} x {gw} samples is more than 2^26 samples \
                 (sampling_ratio {ratio}, spatial_scale {scale})"
            ));
        }
        let count = (gh * gw).max(1) as f32;
        // the samples of every bin, shared by the channels
        let mut samples = Vec::with_capacity(oh * ow * gh * gw);
        for ph in 0..oh {
            for pw in 0..ow {
                for iy in 0..gh {
                    let y = y0 + ph as f32 * bin_h + (iy as f32 + 0.5) * bin_h / gh as f32;
                    for ix in 0..gw {
                        let xx = x0 + pw as f32 * bin_w + (ix as f32 + 0.5) * bin_w / gw as f32;
                        samples.push(sample(h, w, y, xx));
                    }
                }
            }
        }
        for ch in 0..c {
            let plane = &xv[(b * c + ch) * h * w..][..h * w];
            let o = &mut out[(r * c + ch) * oh * ow..][..oh * ow];
            for (bin, cell) in o.iter_mut().enumerate() {
                let ss = &samples[bin * gh * gw..][..gh * gw];
                *cell = if max_mode {
                    ss.iter()
                        .map(|s| {
                            (0..4)
                                .map(|i| s.w[i] * plane[s.pos[i]])
                                .fold(f32::NEG_INFINITY, f32::max)
                        })
                        .fold(None, |m: Option<f32>, v| Some(m.map_or(v, |m| m.max(v))))
                        .unwrap_or(0.0)
                } else {
                    let sum: f32 = ss
                        .iter()
                        .map(|s| (0..4).map(|i| s.w[i] * plane[s.pos[i]]).sum::<f32>())
                        .sum();
                    sum / count
                };
            }
        }
    }
    Ok(vec![Value::Tensor(Tensor::f32(vec![k, c, oh, ow], out))])
}

/// (min, max) of two coordinates.
fn span(a: f32, b: f32) -> (f32, f32) {
    if a >= b { (b, a) } else { (a, b) }
}

/// Whether box `a` suppresses box `b`: their IoU is above `threshold` (corners in any order, or centre and
/// size with `center`).
fn suppresses(a: &[f32], b: &[f32], center: bool, threshold: f32) -> bool {
    let extent = |bx: &[f32]| -> [(f32, f32); 2] {
        if center {
            let (hw, hh) = (bx[2] / 2.0, bx[3] / 2.0);
            [(bx[0] - hw, bx[0] + hw), (bx[1] - hh, bx[1] + hh)]
        } else {
            [span(bx[1], bx[3]), span(bx[0], bx[2])]
        }
    };
    let ([ax, ay], [bx, by]) = (extent(a), extent(b));
    let (ix0, ix1) = (ax.0.max(bx.0), ax.1.min(bx.1));
    if ix1 <= ix0 {
        return false;
    }
    let (iy0, iy1) = (ay.0.max(by.0), ay.1.min(by.1));
    if iy1 <= iy0 {
        return false;
    }
    let inter = (ix1 - ix0) * (iy1 - iy0);
    let area_a = (ax.1 - ax.0) * (ay.1 - ay.0);
    let area_b = (bx.1 - bx.0) * (by.1 - by.0);
    let union = area_a + area_b - inter;
    if inter <= 0.0 || area_a <= 0.0 || area_b <= 0.0 || union <= 0.0 {
        return false;
    }
    inter / union > threshold
}

/// NonMaxSuppression (opsets 10, 11): per batch and class, the boxes above the score threshold from the best
/// score down (ties: the lower index first), each kept unless a kept one overlaps it by more than the IoU
/// threshold, at most `max_output_boxes_per_class` (0 when absent). Output: `[selected, 3]` int64 triples
/// (batch, class, box).
pub(crate) fn non_max_suppression(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (boxes, scores) = (ctx.t(0)?, ctx.t(1)?);
    let scalar = |i: usize| ctx.opt(i).filter(|t| !t.is_empty());
    let max_out = match scalar(2) {
        Some(t) => t.to_i64s()?[0].max(0) as usize,
        None => 0,
    };
    let iou = match scalar(3) {
        Some(t) => t.to_f32s()?[0],
        None => 0.0,
    };
    let score_min = scalar(4).map(|t| t.to_f32s().map(|v| v[0])).transpose()?;
    let center = ctx.ai("center_point_box", 0) != 0;
    let [nb, nbox, 4] = boxes.shape[..] else {
        return Err(format!(
            "boxes must be [batches, boxes, 4], got {:?}",
            boxes.shape
        ));
    };
    let [sb, ncls, sbox] = scores.shape[..] else {
        return Err(format!(
            "scores must be [batches, classes, boxes], got {:?}",
            scores.shape
        ));
    };
    if sb != nb || sbox != nbox {
        return Err(format!(
            "scores {:?} do not match boxes {:?}",
            scores.shape, boxes.shape
        ));
    }
    let (bv, sv) = (boxes.to_f32s()?, scores.to_f32s()?);
    let mut selected: Vec<i64> = Vec::new();
    for b in 0..nb {
        let bb = &bv[b * nbox * 4..][..nbox * 4];
        for cl in 0..ncls {
            let sc = &sv[(b * ncls + cl) * nbox..][..nbox];
            let mut cand: Vec<usize> = (0..nbox)
                .filter(|&i| score_min.is_none_or(|m| sc[i] > m))
                .collect();
            cand.sort_by(|&i, &j| sc[j].total_cmp(&sc[i]).then(i.cmp(&j)));
            let mut kept: Vec<usize> = Vec::new();
            for i in cand {
                if kept.len() >= max_out {
                    break;
                }
                let bi = &bb[i * 4..][..4];
                if kept
                    .iter()
                    .all(|&k| !suppresses(bi, &bb[k * 4..][..4], center, iou))
                {
                    kept.push(i);
                    selected.extend([b as i64, cl as i64, i as i64]);
                }
            }
        }
    }
    let n = selected.len() / 3;
    Ok(vec![Value::Tensor(Tensor::new(
        vec![n, 3],
        crate::Data::I64(selected),
    ))])
}
