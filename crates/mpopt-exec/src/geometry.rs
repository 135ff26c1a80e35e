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
    let get = |name: &str, d: usize| -> Vec<usize> {
        node.attr_ints(name)
            .map(|v| v.iter().map(|&x| x.max(0) as usize).collect())
            .unwrap_or_else(|| vec![d; r])
    };
    let strides = get("strides", 1);
    let dilations = get("dilations", 1);
    let auto = node
        .attr_string("auto_pad")
        .unwrap_or_else(|| "NOTSET".into());
    let mut pad_begin = vec![0; r];
    let mut pad_end = vec![0; r];
    let mut out = vec![0; r];
    for i in 0..r {
        let ek = (kernel[i] - 1) * dilations[i] + 1;
        match auto.as_str() {
            "SAME_UPPER" | "SAME_LOWER" => {
                let o = input[i].div_ceil(strides[i]);
                let total = ((o - 1) * strides[i] + ek).saturating_sub(input[i]);
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
                pad_begin[i] = pads[i].max(0) as usize;
                pad_end[i] = pads[i + r].max(0) as usize;
                let span = input[i] + pad_begin[i] + pad_end[i];
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
