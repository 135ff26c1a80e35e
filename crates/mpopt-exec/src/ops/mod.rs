//! Kernels: one function per op, looked up by name, with the low-precision rule applied in one place.
//!
//! Each kernel reads its inputs from a [`Ctx`] and returns its outputs. Kernels marked [`Low::Compute`] are
//! written for f32 (and f64/integers where the schema allows them): when their first float input is f16 or
//! bf16, [`run`] widens every input of that type to f32, runs the kernel, and rounds each f32 output back once.
//! That is the GPU's contract (load half, compute in float, store half). Kernels marked [`Low::Native`] move or
//! reinterpret data and handle every dtype themselves, so f16 bits pass through untouched.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use mpopt_ir::{AttrValue, DType, Node};

use crate::interp::SubRunner;
use crate::{Data, Tensor, Value};

mod attention;
mod control;
pub(crate) mod elementwise;
mod grid;
pub(crate) mod linalg;
mod microsoft;
mod ml;
pub(crate) mod nn;
mod qlinear;
mod quant;
mod recurrent_blocks;
mod reduce;
mod resize;
mod rnn;
mod roi;
mod rotary;
mod shape;
pub use shape::narrow;
mod spectral;
mod strings;
mod training;

pub use elementwise::{cast_tensor, cast_tensor_sat};

/// A kernel's view of its node.
pub(crate) struct Ctx<'a> {
    pub node: &'a Node,
    pub inputs: Vec<Option<Arc<Value>>>,
    pub opset: i64,
    pub sub: &'a SubRunner<'a, 'a>,
}

type R<T> = Result<T, String>;

impl Ctx<'_> {
    /// Number of input slots (including missing optional ones).
    pub fn n_in(&self) -> usize {
        self.inputs.len()
    }
    /// Input `i` as a value, `None` when absent.
    pub fn val(&self, i: usize) -> Option<&Value> {
        self.inputs.get(i).and_then(|v| v.as_deref())
    }
    /// Required tensor input `i`.
    pub fn t(&self, i: usize) -> R<&Tensor> {
        match self.val(i) {
            Some(v) => v.tensor().map_err(|e| format!("input {i}: {e}")),
            None => Err(format!("input {i} is required")),
        }
    }
    /// Optional tensor input `i`.
    pub fn opt(&self, i: usize) -> Option<&Tensor> {
        match self.val(i) {
            Some(Value::Tensor(t)) => Some(t),
            Some(Value::Opt(Some(v), _)) => v.tensor().ok(),
            _ => None,
        }
    }
    fn attr(&self, name: &str) -> Option<&AttrValue> {
        self.node.attr(name).map(|a| &a.value)
    }
    /// Integer attribute.
    pub fn ai(&self, name: &str, default: i64) -> i64 {
        match self.attr(name) {
            Some(AttrValue::Int(i)) => *i,
            _ => default,
        }
    }
    /// Float attribute.
    pub fn af(&self, name: &str, default: f32) -> f32 {
        match self.attr(name) {
            Some(AttrValue::Float(f)) => *f,
            Some(AttrValue::Int(i)) => *i as f32,
            _ => default,
        }
    }
    /// Ints attribute.
    pub fn ais(&self, name: &str) -> Option<Vec<i64>> {
        match self.attr(name) {
            Some(AttrValue::Ints(v)) => Some(v.clone()),
            Some(AttrValue::Int(i)) => Some(vec![*i]),
            _ => None,
        }
    }
    /// Floats attribute.
    pub fn afs(&self, name: &str) -> Option<Vec<f32>> {
        match self.attr(name) {
            Some(AttrValue::Floats(v)) => Some(v.clone()),
            _ => None,
        }
    }
    /// String attribute.
    pub fn as_str(&self, name: &str) -> Option<String> {
        match self.attr(name) {
            Some(AttrValue::String(s)) => Some(String::from_utf8_lossy(s).into_owned()),
            _ => None,
        }
    }
    /// Strings attribute.
    pub fn astrs(&self, name: &str) -> Option<Vec<String>> {
        match self.attr(name) {
            Some(AttrValue::Strings(v)) => Some(
                v.iter()
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect(),
            ),
            _ => None,
        }
    }
    /// Tensor attribute.
    pub fn atensor(&self, name: &str) -> R<Option<Tensor>> {
        match self.attr(name) {
            Some(AttrValue::Tensor(t)) => Tensor::from_ir(t).map(Some),
            _ => Ok(None),
        }
    }
    /// True when the attribute is present.
    pub fn has(&self, name: &str) -> bool {
        self.attr(name).is_some()
    }
}

/// The fewest items a rayon task should take when each item costs about `work` element operations: small
/// planes (late layers, short frames) are grouped so a hand-off between threads is paid per ~16K operations,
/// not per plane.
pub(crate) fn min_len(work: usize) -> usize {
    (1 << 14) / work.max(1) + 1
}

/// How a kernel treats f16/bf16.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Low {
    /// Written for f32: widen half inputs, compute, round outputs once.
    Compute,
    /// Handles every dtype itself (data movement, casts, shape ops).
    Native,
}

pub(crate) type Kernel = fn(&mut Ctx) -> R<Vec<Value>>;

/// Default-domain ops, with their kernel and low-precision treatment.
const OPS: &[(&str, Kernel, Low)] = {
    use Low::{Compute as C, Native as N};
    use control as ct;
    use elementwise as ew;
    use linalg as la;
    use reduce as rd;
    use shape as sh;
    &[
        // elementwise, unary
        ("Abs", ew::abs, C),
        ("Neg", ew::neg, C),
        ("Relu", ew::relu, C),
        ("Sigmoid", ew::sigmoid, C),
        ("Tanh", ew::tanh, C),
        ("Exp", ew::exp, C),
        ("Log", ew::log, C),
        ("Sqrt", ew::sqrt, C),
        ("Reciprocal", ew::reciprocal, C),
        ("Erf", ew::erf, C),
        ("Floor", ew::floor, C),
        ("Ceil", ew::ceil, C),
        ("Round", ew::round, C),
        ("Sign", ew::sign, C),
        ("Sin", ew::sin, C),
        ("Cos", ew::cos, C),
        ("Tan", ew::tan, C),
        ("Asin", ew::asin, C),
        ("Acos", ew::acos, C),
        ("Atan", ew::atan, C),
        ("Sinh", ew::sinh, C),
        ("Cosh", ew::cosh, C),
        ("Asinh", ew::asinh, C),
        ("Acosh", ew::acosh, C),
        ("Atanh", ew::atanh, C),
        ("Softplus", ew::softplus, C),
        ("Softsign", ew::softsign, C),
        ("HardSigmoid", ew::hard_sigmoid, C),
        ("Swish", ew::swish, C),
        ("SwiGLU", ew::swiglu, C),
        ("BitCast", ew::bitcast, N),
        ("HardSwish", ew::hard_swish, C),
        ("LeakyRelu", ew::leaky_relu, C),
        ("Elu", ew::elu, C),
        ("Selu", ew::selu, C),
        ("Celu", ew::celu, C),
        ("ThresholdedRelu", ew::thresholded_relu, C),
        ("Gelu", ew::gelu, C),
        ("Mish", ew::mish, C),
        ("IsNaN", ew::is_nan, C),
        ("IsInf", ew::is_inf, C),
        ("Not", ew::not, N),
        ("BitwiseNot", ew::bitwise_not, N),
        ("Clip", ew::clip, C),
        ("Shrink", ew::shrink, C),
        ("PRelu", ew::prelu, C),
        // elementwise, binary
        ("Add", ew::add, C),
        ("Sub", ew::sub, C),
        ("Mul", ew::mul, C),
        ("Div", ew::div, C),
        ("Pow", ew::pow, C),
        ("Mod", ew::modulo, C),
        ("Equal", ew::equal, C),
        ("Less", ew::less, C),
        ("LessOrEqual", ew::less_equal, C),
        ("Greater", ew::greater, C),
        ("GreaterOrEqual", ew::greater_equal, C),
        ("And", ew::and, N),
        ("Or", ew::or, N),
        ("Xor", ew::xor, N),
        ("BitwiseAnd", ew::bitwise_and, N),
        ("BitwiseOr", ew::bitwise_or, N),
        ("BitwiseXor", ew::bitwise_xor, N),
        ("BitShift", ew::bit_shift, N),
        ("Max", ew::max, C),
        ("Min", ew::min, C),
        ("Sum", ew::sum, C),
        ("Mean", ew::mean, C),
        ("Where", ew::where_, N),
        ("Cast", ew::cast, N),
        ("CastLike", ew::cast_like, N),
        // shape and data movement
        ("Identity", sh::identity, N),
        ("Constant", sh::constant, N),
        ("Shape", sh::shape, N),
        ("Size", sh::size, N),
        ("Reshape", sh::reshape, N),
        ("Flatten", sh::flatten, N),
        ("Squeeze", sh::squeeze, N),
        ("Unsqueeze", sh::unsqueeze, N),
        ("Transpose", sh::transpose, N),
        ("Concat", sh::concat, N),
        ("Split", sh::split, N),
        ("Slice", sh::slice, N),
        ("Gather", sh::gather, N),
        ("GatherElements", sh::gather_elements, N),
        ("GatherND", sh::gather_nd, N),
        ("ScatterElements", sh::scatter_elements, N),
        ("ScatterND", sh::scatter_nd, N),
        ("TensorScatter", sh::tensor_scatter, N),
        ("Expand", sh::expand, N),
        ("Tile", sh::tile, N),
        ("Pad", sh::pad, N),
        ("ConstantOfShape", sh::constant_of_shape, N),
        ("Range", sh::range, C),
        ("NonZero", sh::non_zero, C),
        ("OneHot", sh::one_hot, C),
        ("EyeLike", sh::eye_like, N),
        ("Trilu", sh::trilu, N),
        ("DepthToSpace", sh::depth_to_space, N),
        ("SpaceToDepth", sh::space_to_depth, N),
        ("ReverseSequence", sh::reverse_sequence, N),
        ("CumSum", sh::cumsum, C),
        ("CumProd", sh::cumprod, C),
        ("Compress", sh::compress, N),
        ("CenterCropPad", sh::center_crop_pad, N),
        ("HannWindow", sh::hann_window, N),
        ("HammingWindow", sh::hamming_window, N),
        ("BlackmanWindow", sh::blackman_window, N),
        ("MelWeightMatrix", sh::mel_weight_matrix, N),
        ("Unique", sh::unique, N),
        ("Det", sh::det, C),
        ("Scatter", sh::scatter_elements, N),
        // linear algebra
        ("MatMul", la::matmul, C),
        ("Gemm", la::gemm, C),
        ("Conv", la::conv, C),
        ("ConvTranspose", la::conv_transpose, C),
        ("Col2Im", la::col2im, C),
        ("Einsum", la::einsum, C),
        ("Attention", attention::attention, C),
        ("LinearAttention", recurrent_blocks::linear_attention, N),
        (
            "CausalConvWithState",
            recurrent_blocks::causal_conv_with_state,
            N,
        ),
        ("RotaryEmbedding", rotary::rotary_embedding, C),
        ("RoiAlign", roi::roi_align, C),
        ("DFT", spectral::dft, C),
        ("STFT", spectral::stft, C),
        ("QuantizeLinear", quant::quantize_linear, N),
        ("DequantizeLinear", quant::dequantize_linear, N),
        ("DynamicQuantizeLinear", quant::dynamic_quantize_linear, N),
        ("MatMulInteger", qlinear::matmul_integer, N),
        ("ConvInteger", qlinear::conv_integer, N),
        ("QLinearMatMul", qlinear::qlinear_matmul, N),
        ("QLinearConv", qlinear::qlinear_conv, N),
        ("NonMaxSuppression", roi::non_max_suppression, C),
        ("AffineGrid", grid::affine_grid, C),
        ("GridSample", grid::grid_sample, C),
        ("DeformConv", grid::deform_conv, C),
        // normalization, pooling, activations with axes
        ("BatchNormalization", nn::batch_norm, C),
        ("InstanceNormalization", nn::instance_norm, C),
        ("LayerNormalization", nn::layer_norm, C),
        ("GroupNormalization", nn::group_norm, C),
        ("LpNormalization", nn::lp_norm, C),
        ("MeanVarianceNormalization", nn::mvn, C),
        ("Softmax", nn::softmax, C),
        ("LogSoftmax", nn::log_softmax, C),
        ("Hardmax", nn::hardmax, C),
        ("MaxPool", nn::max_pool, C),
        ("MaxUnpool", sh::max_unpool, N),
        ("AveragePool", nn::average_pool, C),
        ("LpPool", nn::lp_pool, C),
        ("GlobalAveragePool", nn::global_average_pool, C),
        ("GlobalMaxPool", nn::global_max_pool, C),
        ("GlobalLpPool", nn::global_lp_pool, C),
        ("Dropout", nn::dropout, N),
        ("NegativeLogLikelihoodLoss", nn::nll_loss, C),
        ("SoftmaxCrossEntropyLoss", nn::softmax_cross_entropy_loss, C),
        ("RMSNormalization", nn::rms_norm, C),
        // onnxruntime's, in the default domain (its optimizers write it there)
        (
            "SimplifiedLayerNormalization",
            microsoft::simplified_layer_norm,
            C,
        ),
        ("LRN", nn::lrn, C),
        ("TopK", nn::topk, C),
        // reductions
        ("ReduceSum", rd::reduce_sum, C),
        ("ReduceMean", rd::reduce_mean, C),
        ("ReduceMax", rd::reduce_max, C),
        ("ReduceMin", rd::reduce_min, C),
        ("ReduceProd", rd::reduce_prod, C),
        ("ReduceL1", rd::reduce_l1, C),
        ("ReduceL2", rd::reduce_l2, C),
        ("ReduceLogSum", rd::reduce_log_sum, C),
        ("ReduceLogSumExp", rd::reduce_log_sum_exp, C),
        ("ReduceSumSquare", rd::reduce_sum_square, C),
        ("ArgMax", rd::arg_max, C),
        ("ArgMin", rd::arg_min, C),
        // resampling
        ("Resize", resize::resize, C),
        ("Upsample", resize::upsample, C),
        // recurrent
        ("LSTM", rnn::lstm, C),
        ("GRU", rnn::gru, C),
        ("RNN", rnn::rnn, C),
        // control flow and sequences
        ("If", ct::if_, N),
        ("Loop", ct::loop_, N),
        ("Scan", ct::scan, N),
        ("SequenceConstruct", ct::sequence_construct, N),
        ("SequenceEmpty", ct::sequence_empty, N),
        ("SequenceAt", ct::sequence_at, N),
        ("SequenceMap", ct::sequence_map, N),
        // strings
        ("StringConcat", strings::string_concat, N),
        ("StringSplit", strings::string_split, N),
        ("RegexFullMatch", strings::regex_full_match, N),
        ("StringNormalizer", strings::string_normalizer, N),
        ("TfIdfVectorizer", strings::tfidf_vectorizer, N),
        ("SequenceInsert", ct::sequence_insert, N),
        ("SequenceErase", ct::sequence_erase, N),
        ("SequenceLength", ct::sequence_length, N),
        ("ConcatFromSequence", ct::concat_from_sequence, N),
        ("SplitToSequence", ct::split_to_sequence, N),
        ("Optional", ct::optional, N),
        ("OptionalHasElement", ct::optional_has_element, N),
        ("OptionalGetElement", ct::optional_get_element, N),
    ]
};

fn table() -> &'static HashMap<&'static str, (Kernel, Low)> {
    static T: OnceLock<HashMap<&'static str, (Kernel, Low)>> = OnceLock::new();
    T.get_or_init(|| OPS.iter().map(|&(n, k, l)| (n, (k, l))).collect())
}

/// ai.onnx.ml ops.
const ML_OPS: &[(&str, Kernel, Low)] = &[
    ("Binarizer", ml::binarizer, Low::Native),
    (
        "ArrayFeatureExtractor",
        ml::array_feature_extractor,
        Low::Native,
    ),
    ("LabelEncoder", ml::label_encoder, Low::Native),
    ("TreeEnsemble", ml::tree_ensemble, Low::Native),
];

/// ai.onnx.preview.training ops (the optimizers: their inputs are f32/f64 state, never lowered).
const TRAINING_OPS: &[(&str, Kernel, Low)] = &[
    ("Adagrad", training::adagrad, Low::Native),
    ("Adam", training::adam, Low::Native),
    ("Momentum", training::momentum, Low::Native),
];

/// ai.onnx.preview ops.
const PREVIEW_OPS: &[(&str, Kernel, Low)] =
    &[("FlexAttention", attention::flex_attention, Low::Native)];

/// com.microsoft ops: the fused ops onnxruntime's graph optimizer writes.
const MS_OPS: &[(&str, Kernel, Low)] = &[
    ("FusedConv", microsoft::fused_conv, Low::Compute),
    ("FusedMatMul", microsoft::fused_matmul, Low::Compute),
    ("QuickGelu", microsoft::quick_gelu, Low::Compute),
    ("BiasGelu", microsoft::bias_gelu, Low::Compute),
    ("Gelu", microsoft::gelu, Low::Compute),
    ("FastGelu", microsoft::fast_gelu, Low::Compute),
    (
        "SkipLayerNormalization",
        microsoft::skip_layer_norm,
        Low::Compute,
    ),
    (
        "SkipSimplifiedLayerNormalization",
        microsoft::skip_simplified_layer_norm,
        Low::Compute,
    ),
];

fn lookup(domain: &str, op: &str) -> Option<(Kernel, Low)> {
    let in_table = |t: &[(&str, Kernel, Low)]| t.iter().find(|o| o.0 == op).map(|o| (o.1, o.2));
    match domain {
        "" | "ai.onnx" => table().get(op).copied(),
        "ai.onnx.ml" => in_table(ML_OPS),
        "ai.onnx.preview.training" => in_table(TRAINING_OPS),
        "ai.onnx.preview" => in_table(PREVIEW_OPS),
        "com.microsoft" => in_table(MS_OPS),
        _ => None,
    }
}

/// True when the executor has a kernel for `op` in `domain`.
pub fn is_supported(domain: &str, op: &str) -> bool {
    lookup(domain, op).is_some()
}

/// Every op with a kernel (default domain), sorted.
pub fn supported_ops() -> Vec<&'static str> {
    let mut v: Vec<&str> = OPS.iter().map(|o| o.0).collect();
    v.sort_unstable();
    v
}

/// Outputs kept in f32 by their schema even when the op runs on half data (LayerNormalization's mean and
/// inverse standard deviation use `stash_type`).
fn stays_f32(op: &str, slot: usize) -> bool {
    match op {
        "LayerNormalization" | "SimplifiedLayerNormalization" => slot > 0,
        // (the fourth output, the sum, has the input's type)
        "SkipLayerNormalization" | "SkipSimplifiedLayerNormalization" => slot == 1 || slot == 2,
        _ => false,
    }
}

/// Runs the node's kernel with the low-precision rule.
pub(crate) fn run(ctx: &mut Ctx) -> R<Vec<Arc<Value>>> {
    let (kernel, low) = lookup(&ctx.node.domain, &ctx.node.op_type)
        .ok_or_else(|| format!("no kernel for {}", ctx.node.qualified_op()))?;
    if low == Low::Native {
        // Ops that return their input unchanged pass the value through without a copy.
        let op = ctx.node.op_type.as_str();
        let same_cast = op == "Cast" && ctx.t(0).is_ok_and(|t| t.dtype() as i64 == ctx.ai("to", 0))
            || op == "CastLike"
                && ctx
                    .t(0)
                    .is_ok_and(|t| ctx.t(1).is_ok_and(|u| u.dtype() == t.dtype()));
        if (op == "Identity" || same_cast)
            && ctx.node.outputs().len() == 1
            && let Some(v) = ctx.inputs.first().cloned().flatten()
        {
            return Ok(vec![v]);
        }
        return Ok(kernel(ctx)?.into_iter().map(Arc::new).collect());
    }
    let first_float = ctx.inputs.iter().flatten().find_map(|v| match &**v {
        Value::Tensor(t) if t.data.is_float() => Some(t.dtype()),
        _ => None,
    });
    let Some(lt @ (DType::F16 | DType::BF16)) = first_float else {
        return Ok(kernel(ctx)?.into_iter().map(Arc::new).collect());
    };
    for slot in ctx.inputs.iter_mut() {
        if let Some(v) = slot
            && let Value::Tensor(t) = &**v
            && t.dtype() == lt
        {
            let w = Tensor::new(t.shape.clone(), Data::F32(t.to_f32s()?));
            *slot = Some(Arc::new(Value::Tensor(w)));
        }
    }
    let outs = kernel(ctx)?;
    let op = ctx.node.op_type.as_str();
    Ok(outs
        .into_iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::Tensor(Tensor {
                shape,
                data: Data::F32(x),
            }) if !stays_f32(op, i) => {
                Value::Tensor(Tensor::new(shape, crate::tensor::round_to(&x, lt)))
            }
            other => other,
        })
        .map(Arc::new)
        .collect())
}

/// Normalizes a possibly negative axis against `rank`.
/// [`axis`] for an op that indexes the input's dims along it: a scalar (rank 0) has none.
pub(crate) fn dim_axis(a: i64, rank: usize) -> R<usize> {
    if rank == 0 {
        return Err(format!(
            "axis {a} of a scalar: the input needs at least one dim"
        ));
    }
    axis(a, rank)
}

pub(crate) fn axis(a: i64, rank: usize) -> R<usize> {
    let r = rank as i64;
    let x = if a < 0 { a + r } else { a };
    if (0..r.max(1)).contains(&x) || (r == 0 && x == 0) {
        Ok(x as usize)
    } else {
        Err(format!("axis {a} is out of range for rank {rank}"))
    }
}

/// One output tensor.
pub(crate) fn one(t: Tensor) -> R<Vec<Value>> {
    Ok(vec![Value::Tensor(t)])
}
