//! Convolution and pooling window geometry, shared by the CPU executor and the CUDA executor so both
//! compute the same output sizes and paddings from a node's attributes.

use mpopt_ir::Node;

/// Spatial geometry of a convolution or pooling window.
#[derive(Clone, Debug)]
pub struct Window {
    /// Kernel size per spatial dim.
    pub kernel: Vec<usize>,
    /// Strides.
    pub strides: Vec<usize>,
    /// Dilations.
    pub dilations: Vec<usize>,
    /// Padding before each spatial dim.
    pub pad_begin: Vec<usize>,
    /// Padding after each spatial dim.
    pub pad_end: Vec<usize>,
    /// Output size per spatial dim.
    pub out: Vec<usize>,
}

/// A per-axis attribute (`strides`, `dilations`): `r` entries of at least 1, or 1 on every axis when the
/// node has none. A wrong length or a 0 is an invalid model, reported rather than divided by.
pub fn per_axis(name: &str, given: Option<Vec<i64>>, r: usize) -> Result<Vec<usize>, String> {
    match given {
        None => Ok(vec![1; r]),
        Some(v) if v.len() == r && v.iter().all(|&x| x >= 1) => {
            Ok(v.into_iter().map(|x| x as usize).collect())
        }
        Some(v) => Err(format!(
            "{name} {v:?}: expected {r} values of at least 1, one per spatial dim"
        )),
    }
}

/// A convolution's `group` (`name`: the attribute): at least 1.
pub fn group(name: &str, g: i64) -> Result<usize, String> {
    if g >= 1 {
        Ok(g as usize)
    } else {
        Err(format!("{name} {g}: must be at least 1"))
    }
}

/// Resolves kernel, strides, dilations, pads (explicit or `auto_pad`) and output sizes. `ceil` rounds the
/// output size up (pooling's `ceil_mode`).
pub fn window(
    node: &Node,
    input: &[usize],
    kernel: Vec<usize>,
    ceil: bool,
) -> Result<Window, String> {
    let r = input.len();
    if kernel.len() != r {
        return Err(format!(
            "kernel {kernel:?} does not match spatial dims {input:?}"
        ));
    }
    if kernel.contains(&0) {
        return Err(format!("kernel {kernel:?} has an empty dim"));
    }
    let strides = per_axis("strides", node.attr_ints("strides"), r)?;
    let dilations = per_axis("dilations", node.attr_ints("dilations"), r)?;
    let auto = node
        .attr_string("auto_pad")
        .unwrap_or_else(|| "NOTSET".into());
    let mut pad_begin = vec![0; r];
    let mut pad_end = vec![0; r];
    let mut out = vec![0; r];
    for i in 0..r {
        let ek = (kernel[i] - 1)
            .checked_mul(dilations[i])
            .filter(|&e| e < crate::tensor::MAX_DIM)
            .ok_or_else(|| {
                format!(
                    "kernel {kernel:?} with dilations {dilations:?} spans more than 2^31 along dim {i}"
                )
            })?
            + 1;
        match auto.as_str() {
            "SAME_UPPER" | "SAME_LOWER" => {
                let o = input[i].div_ceil(strides[i]);
                let total = (o.saturating_sub(1) * strides[i] + ek).saturating_sub(input[i]);
                let small = total / 2;
                let (b, e) = if auto == "SAME_UPPER" {
                    (small, total - small)
                } else {
                    (total - small, small)
                };
                pad_begin[i] = b;
                pad_end[i] = e;
                out[i] = o;
            }
            "VALID" => {
                out[i] = if input[i] >= ek {
                    (input[i] - ek) / strides[i] + 1
                } else {
                    0
                };
            }
            _ => {
                let pads = node.attr_ints("pads").unwrap_or_else(|| vec![0; 2 * r]);
                if pads.len() != 2 * r {
                    return Err(format!("pads {pads:?} do not match {r} spatial dims"));
                }
                if pads.iter().any(|&p| p < 0) {
                    return Err(format!("pads {pads:?} are negative"));
                }
                pad_begin[i] = pads[i] as usize;
                pad_end[i] = pads[i + r] as usize;
                let span = input[i]
                    .saturating_add(pad_begin[i])
                    .saturating_add(pad_end[i]);
                if span > crate::tensor::MAX_DIM {
                    return Err(format!(
                        "pads {pads:?} make spatial dim {i} {span} long (more than 2^31)"
                    ));
                }
                if span < ek {
                    return Err(format!(
                        "kernel {kernel:?} is larger than the padded input {input:?}"
                    ));
                }
                let num = span - ek;
                out[i] = if ceil {
                    let o = num.div_ceil(strides[i]) + 1;
                    // The last window must start inside the input or the left padding.
                    if (o - 1) * strides[i] >= input[i] + pad_begin[i] {
                        o - 1
                    } else {
                        o
                    }
                } else {
                    num / strides[i] + 1
                };
            }
        }
    }
    Ok(Window {
        kernel,
        strides,
        dilations,
        pad_begin,
        pad_end,
        out,
    })
}
