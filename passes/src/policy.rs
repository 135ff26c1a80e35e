//! The precision policy: every operator classed allow / infer / clear / deny, with the reason, in one table
//! (the spirit of TensorFlow's auto-mixed-precision lists).
//!
//! - **allow**: compute-bound ops that are safe and fast in fp16/bf16 (GPU kernels accumulate in f32).
//! - **infer**: ops that are fine in low precision when their neighbours are low (elementwise arithmetic,
//!   activations, pooling); they follow the graph around them.
//! - **clear**: ops that move or select data without arithmetic; they never change a value, so they take
//!   whatever precision flows in.
//! - **deny**: ops that overflow, lose precision or accumulate badly in fp16 (exp, pow, log, summing
//!   reductions, softmax, statistics of the normalizations, cumulative sums, losses, recurrent state), and
//!   ops that are shape arithmetic, indices or coordinates. They stay fp32 unless the user forces them.
//!
//! An op missing from the table (custom domains) is denied: mpopt never lowers what it does not know.
//! `keep` marks control flow (If/Loop/Scan, SequenceMap): the node keeps its interface types and its bodies
//! are decided on their own.

/// How an op takes part in precision assignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpClass {
    /// Lowered whenever the schema and the data allow.
    Allow,
    /// Lowered when between low nodes.
    Infer,
    /// Follows the precision that flows in.
    Clear,
    /// Kept in fp32.
    Deny,
    /// Control flow: interface unchanged, bodies decided separately.
    Keep,
}

impl OpClass {
    /// The name used in reports and policy files.
    pub fn name(self) -> &'static str {
        match self {
            OpClass::Allow => "allow",
            OpClass::Infer => "infer",
            OpClass::Clear => "clear",
            OpClass::Deny => "deny",
            OpClass::Keep => "keep",
        }
    }

    /// Parses a class name.
    pub fn parse(s: &str) -> Option<OpClass> {
        Some(match s {
            "allow" => OpClass::Allow,
            "infer" => OpClass::Infer,
            "clear" => OpClass::Clear,
            "deny" => OpClass::Deny,
            "keep" => OpClass::Keep,
            _ => return None,
        })
    }
}

use OpClass::*;

const MATMUL: &str = "matrix product: tensor cores, f32 accumulation on GPUs";
const CONV: &str = "convolution: tensor cores, f32 accumulation on GPUs";
const ELEMENTWISE: &str = "elementwise arithmetic: rounds once, safe between low nodes";
const ACTIVATION: &str = "bounded or monotone activation: no overflow from its own arithmetic";
const COMPARE: &str = "comparison: exact in any precision, follows its inputs";
const MOVE: &str = "moves or selects data, never changes a value";
const SHAPE: &str = "reads only the shape or size";
const REDUCE_SUM: &str =
    "summing reduction: overflows or loses precision over many elements in fp16";
const STATS: &str = "computes normalization statistics in the input precision";
const FUSED_NORM: &str = "fused normalization: statistics in f32 (stash_type)";
const EXP_LIKE: &str = "exp/log/pow: overflows (e^11 > 65504) or loses the small values";
const SOFTMAX: &str = "softmax inputs need f32: exp of large logits overflows fp16";
const INDEX: &str =
    "indices, coordinates or shape arithmetic: integers are exact in fp16 only to 2048";
const RNN: &str = "recurrent state accumulates over time steps";
const LOSS: &str = "loss: log of probabilities and summing reduction";
const QUANT: &str = "quantization op: its float parameters are scales, kept as the model has them";
const SPECTRAL: &str = "spectral transform: long sums of products lose precision in fp16";
const GENERATE: &str = "generates values of a requested dtype; the dtype attribute is rewritten";
const CONTROL: &str = "control flow: interface types unchanged, bodies decided separately";
const NONFLOAT: &str = "no float data";
const RANDOM_SAMPLE: &str = "samples from probabilities: precision of the distribution matters";

/// (op, class, reason) for the default domain (ai.onnx), every op in onnx 1.23.2.
pub const DEFAULT_DOMAIN: &[(&str, OpClass, &str)] = &[
    ("Abs", Infer, ELEMENTWISE),
    ("Acos", Infer, ACTIVATION),
    ("Acosh", Infer, ACTIVATION),
    ("Add", Infer, ELEMENTWISE),
    ("AffineGrid", Deny, INDEX),
    ("And", Clear, NONFLOAT),
    ("ArgMax", Infer, COMPARE),
    ("ArgMin", Infer, COMPARE),
    ("Asin", Infer, ACTIVATION),
    ("Asinh", Infer, ACTIVATION),
    ("Atan", Infer, ACTIVATION),
    ("Atanh", Infer, ACTIVATION),
    (
        "Attention",
        Allow,
        "fused attention: GPU kernels keep softmax and accumulation in f32",
    ),
    (
        "AveragePool",
        Infer,
        "window average: small sums, f32 accumulation on GPUs",
    ),
    (
        "BatchNormalization",
        Infer,
        "inference batch norm is an affine map with fixed statistics",
    ),
    ("Bernoulli", Deny, RANDOM_SAMPLE),
    (
        "BitCast",
        Deny,
        "reinterprets bits: changing the dtype would change the meaning",
    ),
    ("BitShift", Clear, NONFLOAT),
    ("BitwiseAnd", Clear, NONFLOAT),
    ("BitwiseNot", Clear, NONFLOAT),
    ("BitwiseOr", Clear, NONFLOAT),
    ("BitwiseXor", Clear, NONFLOAT),
    ("BlackmanWindow", Deny, SPECTRAL),
    (
        "Cast",
        Clear,
        "converts dtype; its `to` follows the decision",
    ),
    ("CastLike", Clear, "converts dtype like its second input"),
    ("CausalConvWithState", Allow, CONV),
    ("Ceil", Infer, ELEMENTWISE),
    ("Celu", Infer, ACTIVATION),
    ("CenterCropPad", Clear, MOVE),
    ("Clip", Infer, ACTIVATION),
    ("Col2Im", Clear, MOVE),
    ("Compress", Clear, MOVE),
    ("Concat", Clear, MOVE),
    ("ConcatFromSequence", Clear, MOVE),
    (
        "Constant",
        Clear,
        "a constant: converted in place when its consumers are low",
    ),
    ("ConstantOfShape", Clear, GENERATE),
    ("Conv", Allow, CONV),
    ("ConvInteger", Clear, NONFLOAT),
    ("ConvTranspose", Allow, CONV),
    ("Cos", Infer, ACTIVATION),
    ("Cosh", Deny, EXP_LIKE),
    (
        "CumProd",
        Deny,
        "cumulative product: overflows quickly in fp16",
    ),
    (
        "CumSum",
        Deny,
        "cumulative sum: loses precision and overflows over long axes in fp16",
    ),
    ("DFT", Deny, SPECTRAL),
    ("DeformConv", Deny, INDEX),
    ("DepthToSpace", Clear, MOVE),
    ("DequantizeLinear", Deny, QUANT),
    ("Det", Deny, "determinant: products of many values overflow"),
    ("Div", Infer, ELEMENTWISE),
    ("Dropout", Clear, "inference dropout is the identity"),
    ("DynamicQuantizeLinear", Deny, QUANT),
    ("Einsum", Allow, MATMUL),
    ("Elu", Infer, ACTIVATION),
    ("Equal", Infer, COMPARE),
    ("Erf", Infer, ACTIVATION),
    ("Exp", Deny, EXP_LIKE),
    ("Expand", Clear, MOVE),
    ("EyeLike", Clear, GENERATE),
    ("Flatten", Clear, MOVE),
    ("Floor", Infer, ELEMENTWISE),
    ("GRU", Deny, RNN),
    ("Gather", Clear, MOVE),
    ("GatherElements", Clear, MOVE),
    ("GatherND", Clear, MOVE),
    ("Gelu", Infer, ACTIVATION),
    ("Gemm", Allow, MATMUL),
    (
        "GlobalAveragePool",
        Infer,
        "spatial mean: f32 accumulation on GPUs",
    ),
    ("GlobalLpPool", Deny, REDUCE_SUM),
    ("GlobalMaxPool", Clear, "selects the maximum: exact"),
    ("Greater", Infer, COMPARE),
    ("GreaterOrEqual", Infer, COMPARE),
    ("GridSample", Deny, INDEX),
    ("GroupNormalization", Deny, STATS),
    ("HammingWindow", Deny, SPECTRAL),
    ("HannWindow", Deny, SPECTRAL),
    ("HardSigmoid", Infer, ACTIVATION),
    ("HardSwish", Infer, ACTIVATION),
    ("Hardmax", Infer, COMPARE),
    ("Identity", Clear, MOVE),
    ("If", Keep, CONTROL),
    ("ImageDecoder", Clear, NONFLOAT),
    ("InstanceNormalization", Deny, STATS),
    ("IsInf", Infer, COMPARE),
    ("IsNaN", Infer, COMPARE),
    ("LRN", Deny, "sums of squares over channels"),
    ("LSTM", Deny, RNN),
    ("LayerNormalization", Infer, FUSED_NORM),
    ("LeakyRelu", Infer, ACTIVATION),
    ("Less", Infer, COMPARE),
    ("LessOrEqual", Infer, COMPARE),
    ("LinearAttention", Deny, RNN),
    ("Log", Deny, EXP_LIKE),
    ("LogSoftmax", Deny, SOFTMAX),
    ("Loop", Keep, CONTROL),
    ("LpNormalization", Deny, STATS),
    ("LpPool", Deny, REDUCE_SUM),
    ("MatMul", Allow, MATMUL),
    ("MatMulInteger", Clear, NONFLOAT),
    ("Max", Infer, COMPARE),
    ("MaxPool", Clear, "selects the maximum: exact"),
    ("MaxRoiPool", Deny, INDEX),
    ("MaxUnpool", Clear, MOVE),
    ("Mean", Infer, ELEMENTWISE),
    ("MeanVarianceNormalization", Deny, STATS),
    ("MelWeightMatrix", Deny, SPECTRAL),
    ("Min", Infer, COMPARE),
    ("Mish", Infer, ACTIVATION),
    ("Mod", Infer, ELEMENTWISE),
    ("Mul", Infer, ELEMENTWISE),
    ("Multinomial", Deny, RANDOM_SAMPLE),
    ("Neg", Infer, ELEMENTWISE),
    ("NegativeLogLikelihoodLoss", Deny, LOSS),
    ("NonMaxSuppression", Deny, INDEX),
    ("NonZero", Clear, COMPARE),
    ("Not", Clear, NONFLOAT),
    ("OneHot", Clear, MOVE),
    ("Optional", Clear, MOVE),
    ("OptionalGetElement", Clear, MOVE),
    ("OptionalHasElement", Clear, NONFLOAT),
    ("Or", Clear, NONFLOAT),
    ("PRelu", Infer, ACTIVATION),
    ("Pad", Clear, MOVE),
    ("Pow", Deny, EXP_LIKE),
    ("QLinearConv", Deny, QUANT),
    ("QLinearMatMul", Deny, QUANT),
    ("QuantizeLinear", Deny, QUANT),
    ("RMSNormalization", Infer, FUSED_NORM),
    ("RNN", Deny, RNN),
    ("RandomNormal", Clear, GENERATE),
    ("RandomNormalLike", Clear, GENERATE),
    ("RandomUniform", Clear, GENERATE),
    ("RandomUniformLike", Clear, GENERATE),
    ("Range", Deny, INDEX),
    ("Reciprocal", Deny, "1/x overflows fp16 for |x| < 1.5e-5"),
    ("ReduceL1", Deny, REDUCE_SUM),
    ("ReduceL2", Deny, REDUCE_SUM),
    ("ReduceLogSum", Deny, REDUCE_SUM),
    ("ReduceLogSumExp", Deny, REDUCE_SUM),
    ("ReduceMax", Clear, "selects the maximum: exact"),
    ("ReduceMean", Deny, REDUCE_SUM),
    ("ReduceMin", Clear, "selects the minimum: exact"),
    ("ReduceProd", Deny, "product of many values overflows"),
    ("ReduceSum", Deny, REDUCE_SUM),
    ("ReduceSumSquare", Deny, REDUCE_SUM),
    ("RegexFullMatch", Clear, NONFLOAT),
    ("Relu", Infer, ACTIVATION),
    ("Reshape", Clear, MOVE),
    (
        "Resize",
        Infer,
        "interpolation of neighbours; scales, roi and sizes stay as the schema types them",
    ),
    ("ReverseSequence", Clear, MOVE),
    ("RoiAlign", Deny, INDEX),
    (
        "RotaryEmbedding",
        Infer,
        "rotation by precomputed sin/cos: elementwise",
    ),
    ("Round", Infer, ELEMENTWISE),
    ("STFT", Deny, SPECTRAL),
    ("Scan", Keep, CONTROL),
    ("Scatter", Clear, MOVE),
    ("ScatterElements", Clear, MOVE),
    ("ScatterND", Clear, MOVE),
    ("Selu", Infer, ACTIVATION),
    ("SequenceAt", Clear, MOVE),
    ("SequenceConstruct", Clear, MOVE),
    ("SequenceEmpty", Clear, GENERATE),
    ("SequenceErase", Clear, MOVE),
    ("SequenceInsert", Clear, MOVE),
    ("SequenceLength", Clear, SHAPE),
    ("SequenceMap", Keep, CONTROL),
    ("Shape", Clear, SHAPE),
    ("Shrink", Infer, ACTIVATION),
    ("Sigmoid", Infer, ACTIVATION),
    ("Sign", Infer, ELEMENTWISE),
    // onnxruntime registers it in the default domain (its optimizers write it there): RMS normalization
    ("SimplifiedLayerNormalization", Infer, FUSED_NORM),
    ("Sin", Infer, ACTIVATION),
    ("Sinh", Deny, EXP_LIKE),
    ("Size", Clear, SHAPE),
    ("Slice", Clear, MOVE),
    ("Softmax", Deny, SOFTMAX),
    ("SoftmaxCrossEntropyLoss", Deny, LOSS),
    ("Softplus", Deny, "log(1 + e^x): exp overflows fp16"),
    ("Softsign", Infer, ACTIVATION),
    ("SpaceToDepth", Clear, MOVE),
    ("Split", Clear, MOVE),
    ("SplitToSequence", Clear, MOVE),
    ("Sqrt", Infer, "square root shrinks magnitudes"),
    ("Squeeze", Clear, MOVE),
    ("StringConcat", Clear, NONFLOAT),
    ("StringNormalizer", Clear, NONFLOAT),
    ("StringSplit", Clear, NONFLOAT),
    ("Sub", Infer, ELEMENTWISE),
    ("Sum", Infer, ELEMENTWISE),
    ("SwiGLU", Infer, ACTIVATION),
    ("Swish", Infer, ACTIVATION),
    ("Tan", Infer, ACTIVATION),
    ("Tanh", Infer, ACTIVATION),
    ("TensorScatter", Clear, MOVE),
    ("TfIdfVectorizer", Deny, REDUCE_SUM),
    ("ThresholdedRelu", Infer, ACTIVATION),
    ("Tile", Clear, MOVE),
    ("TopK", Clear, "selects the largest values: exact"),
    ("Transpose", Clear, MOVE),
    ("Trilu", Clear, MOVE),
    ("Unique", Clear, MOVE),
    ("Unsqueeze", Clear, MOVE),
    (
        "Upsample",
        Infer,
        "interpolation of neighbours; scales stay f32",
    ),
    ("Where", Infer, "selects between its inputs elementwise"),
    ("Xor", Clear, NONFLOAT),
];

/// (op, class, reason) for the com.microsoft contrib ops that show up in exported models.
pub const COM_MICROSOFT: &[(&str, OpClass, &str)] = &[
    (
        "Attention",
        Allow,
        "fused attention: f32 softmax and accumulation in the kernels",
    ),
    ("BiasAdd", Infer, ELEMENTWISE),
    ("BiasGelu", Infer, ACTIVATION),
    ("BiasSplitGelu", Infer, ACTIVATION),
    ("EmbedLayerNormalization", Infer, FUSED_NORM),
    ("FastGelu", Infer, ACTIVATION),
    ("FusedConv", Allow, CONV),
    ("FusedGemm", Allow, MATMUL),
    ("FusedMatMul", Allow, MATMUL),
    ("GemmFastGelu", Allow, MATMUL),
    (
        "GroupQueryAttention",
        Allow,
        "fused attention: f32 softmax and accumulation in the kernels",
    ),
    (
        "MultiHeadAttention",
        Allow,
        "fused attention: f32 softmax and accumulation in the kernels",
    ),
    ("QuickGelu", Infer, ACTIVATION),
    (
        "RotaryEmbedding",
        Infer,
        "rotation by precomputed sin/cos: elementwise",
    ),
    ("SkipLayerNormalization", Infer, FUSED_NORM),
    ("SkipSimplifiedLayerNormalization", Infer, FUSED_NORM),
    ("Gelu", Infer, ACTIVATION),
    ("DynamicQuantizeMatMul", Deny, QUANT),
    ("MatMulNBits", Deny, QUANT),
    ("QAttention", Deny, QUANT),
    ("QLinearAdd", Deny, QUANT),
];

/// The class of an op, and why. Unknown ops are denied.
pub fn class_of(domain: &str, op: &str) -> (OpClass, &'static str) {
    let table = match domain {
        "" | "ai.onnx" => DEFAULT_DOMAIN,
        "com.microsoft" => COM_MICROSOFT,
        "ai.onnx.ml" => {
            return (
                Deny,
                "ai.onnx.ml ops take f32/f64 by their schemas and are rarely hot",
            );
        }
        _ => {
            return (
                Deny,
                "no policy for this op: mpopt does not lower what it does not know",
            );
        }
    };
    table.iter().find(|(n, _, _)| *n == op).map_or(
        (
            Deny,
            "no policy for this op: mpopt does not lower what it does not know",
        ),
        |(_, c, r)| (*c, *r),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_default_domain_op_has_exactly_one_entry() {
        let reg = mpopt_ir::schema::registry();
        let mut missing: Vec<&str> = reg
            .ops()
            .filter(|(d, _)| d.is_empty())
            .map(|(_, n)| n)
            .filter(|n| !DEFAULT_DOMAIN.iter().any(|(op, _, _)| op == n))
            .collect();
        missing.sort_unstable();
        assert!(
            missing.is_empty(),
            "ops without a policy entry: {missing:?}"
        );
        let mut names: Vec<&str> = DEFAULT_DOMAIN.iter().map(|(n, _, _)| *n).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "duplicate entries");
        assert!(DEFAULT_DOMAIN.iter().all(|(_, _, r)| !r.is_empty()));
        assert_eq!(class_of("", "MatMul").0, Allow);
        assert_eq!(class_of("", "Softmax").0, Deny);
        assert_eq!(class_of("org.custom", "Foo").0, Deny);
    }
}
