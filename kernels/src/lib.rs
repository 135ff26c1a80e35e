//! mpopt's CUDA kernels as source text, for NVRTC.
//!
//! Each `.cu` file under `kernels/cu/` is one module; [`Module::source`] returns it with the shared prelude
//! (`cu/prelude.cuh`: element type codes, exact f16/bf16 conversions, the strided-index descriptor) in front,
//! so NVRTC compiles it with no include path. Kernel names are typed constants ([`Kernel`]): a test checks
//! that each one is an `extern "C" __global__` function of its file and that every such function is listed,
//! so a renamed kernel fails `cargo test` on any machine instead of failing a launch on a GPU.
//!
//! The op codes the kernels switch on ([`Unary`], [`Binary`], [`Compare`], [`Reduce`]...) are `#[repr(i32)]`
//! enums whose values match the `case` labels in the sources; tests check each against its comment there.
//!
//! This crate knows nothing of CUDA itself: `mpopt-cuda` compiles and launches these kernels.

#![deny(missing_docs)]

/// The shared prelude prepended to every module.
pub const PRELUDE: &str = include_str!("../cu/prelude.cuh");

/// A `.cu` file, compiled as one NVRTC module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Module {
    /// Unary and binary maps, comparisons, Where, float casts.
    Elementwise,
    /// Strided copies, Gather, fills.
    Movement,
    /// Reductions, Softmax, LayerNormalization.
    Reduce,
    /// im2col, pooling, BatchNormalization, Resize.
    Nn,
}

impl Module {
    /// Every module.
    pub const ALL: [Module; 4] = [
        Module::Elementwise,
        Module::Movement,
        Module::Reduce,
        Module::Nn,
    ];

    /// The file name (without `.cu`).
    pub fn name(self) -> &'static str {
        match self {
            Module::Elementwise => "elementwise",
            Module::Movement => "movement",
            Module::Reduce => "reduce",
            Module::Nn => "nn",
        }
    }

    /// The file's own text (without the prelude).
    pub fn file_source(self) -> &'static str {
        match self {
            Module::Elementwise => include_str!("../cu/elementwise.cu"),
            Module::Movement => include_str!("../cu/movement.cu"),
            Module::Reduce => include_str!("../cu/reduce.cu"),
            Module::Nn => include_str!("../cu/nn.cu"),
        }
    }

    /// What NVRTC compiles: the prelude, then the file.
    pub fn source(self) -> String {
        format!(
            "{PRELUDE}\n// ---- {}.cu ----\n{}",
            self.name(),
            self.file_source()
        )
    }

    /// The kernels of this module.
    pub fn kernels(self) -> impl Iterator<Item = Kernel> {
        ALL_KERNELS
            .iter()
            .copied()
            .filter(move |k| k.module == self)
    }
}

/// One kernel: the module that defines it and its `extern "C"` name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Kernel {
    /// The module.
    pub module: Module,
    /// The function name in the module.
    pub name: &'static str,
}

macro_rules! kernels {
    ($($(#[$doc:meta])* $konst:ident = $module:ident :: $name:literal;)*) => {
        $($(#[$doc])* pub const $konst: Kernel = Kernel { module: Module::$module, name: $name };)*
        /// Every kernel, in declaration order.
        pub const ALL_KERNELS: &[Kernel] = &[$($konst),*];
    };
}

kernels! {
    /// `unary(x, y, n, tx, ty, op, a, b)`: a [`Unary`] map between float types.
    UNARY = Elementwise::"unary";
    /// `binary(a, b, y, n, strides, t, op, s)`: a broadcasting [`Binary`] op.
    BINARY = Elementwise::"binary";
    /// `compare(a, b, y, n, strides, t, op)`: a broadcasting [`Compare`] of floats into bool.
    COMPARE = Elementwise::"compare";
    /// `compare_int(a, b, y, n, strides, op, es)`: a broadcasting [`Compare`] of int32/int64 into bool.
    COMPARE_INT = Elementwise::"compare_int";
    /// `where_sel(c, a, b, y, n, v, w, es)`: Where, by element size.
    WHERE = Elementwise::"where_sel";
    /// `cast_float(x, y, n, tx, ty)`: Cast between f32, f16 and bf16.
    CAST_FLOAT = Elementwise::"cast_float";
    /// `cast_int_float(x, y, n, es, ty)`: Cast from bool/uint8, int32 or int64 to a float type.
    CAST_INT_FLOAT = Elementwise::"cast_int_float";
    /// `not_bool(x, y, n)`: Not.
    NOT = Elementwise::"not_bool";
    /// `strided_copy(src, dst, n, strides, es)`: Transpose, Slice, Concat, Expand, Pad.
    STRIDED_COPY = Movement::"strided_copy";
    /// `gather(src, idx, dst, outer, axis_len, nidx, inner, es)`.
    GATHER = Movement::"gather";
    /// `fill(dst, n, bits, es)`.
    FILL = Movement::"fill";
    /// `pad_index(src, dst, n, strides, mode, es)`: Pad in edge (0) or reflect (1) mode.
    PAD_INDEX = Movement::"pad_index";
    /// `reduce(x, y, outer, r, inner, tx, ty, op)`: a [`Reduce`] over the middle axis.
    REDUCE = Reduce::"reduce";
    /// `softmax(x, y, outer, r, inner, t, op)`: Softmax (op 0) or LogSoftmax (op 1) over the middle axis.
    SOFTMAX = Reduce::"softmax";
    /// `layer_norm(x, scale, bias, y, outer, r, eps, t, tp)`.
    LAYER_NORM = Reduce::"layer_norm";
    /// `im2col(x, col, C, H, W, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw, es)`.
    IM2COL = Nn::"im2col";
    /// `pool2d(x, y, NC, H, W, OH, OW, KH, KW, sh, sw, ph, pw, dh, dw, EH, EW, mode, count_include_pad, t)`.
    POOL2D = Nn::"pool2d";
    /// `batch_norm(x, scale, bias, mean, var, y, N, C, HW, eps, t, tp)`.
    BATCH_NORM = Nn::"batch_norm";
    /// `resize2d(x, y, NC, H, W, OH, OW, sh, sw, mode, ctm, nearest_mode, t)`.
    RESIZE2D = Nn::"resize2d";
}

/// Element type codes of the float kernels (`T_F32`... in the prelude).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    /// float
    F32 = 0,
    /// IEEE half, stored as 16 bits
    F16 = 1,
    /// bfloat16, stored as 16 bits
    BF16 = 2,
}

/// Op codes of [`UNARY`] (the `case` labels of `unary_op`).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Unary {
    Relu = 0,
    Sigmoid = 1,
    Tanh = 2,
    Exp = 3,
    Log = 4,
    Sqrt = 5,
    Neg = 6,
    Abs = 7,
    Erf = 8,
    Reciprocal = 9,
    Clip = 10,
    HardSigmoid = 11,
    LeakyRelu = 12,
    Gelu = 13,
    HardSwish = 14,
    Floor = 15,
    Ceil = 16,
    Sin = 17,
    Cos = 18,
    Identity = 19,
}

/// Op codes of [`BINARY`].
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Binary {
    Add = 0,
    Sub = 1,
    Mul = 2,
    Div = 3,
    Pow = 4,
    Max = 5,
    Min = 6,
    /// `a + s·b`
    AddScaled = 7,
}

/// Op codes of [`COMPARE`] and [`COMPARE_INT`].
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Compare {
    Equal = 0,
    Less = 1,
    Greater = 2,
    LessOrEqual = 3,
    GreaterOrEqual = 4,
}

/// Op codes of [`REDUCE`].
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Reduce {
    Sum = 0,
    Mean = 1,
    Max = 2,
    Min = 3,
    SumSquare = 4,
    L1 = 5,
    L2 = 6,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names of the `extern "C" __global__` functions of a source text.
    fn globals(src: &str) -> Vec<String> {
        let key = "extern \"C\" __global__ void ";
        src.match_indices(key)
            .map(|(i, _)| {
                let rest = &src[i + key.len()..];
                rest[..rest.find('(').unwrap()].trim().to_string()
            })
            .collect()
    }

    #[test]
    fn every_kernel_is_a_global_of_its_file_and_every_global_is_listed() {
        for m in Module::ALL {
            let defined = globals(m.file_source());
            let listed: Vec<&str> = m.kernels().map(|k| k.name).collect();
            for k in &listed {
                assert!(
                    defined.iter().any(|d| d == k),
                    "kernel {k} is not an extern \"C\" __global__ in {}.cu",
                    m.name()
                );
            }
            for d in &defined {
                assert!(
                    listed.contains(&d.as_str()),
                    "{}.cu defines {d}, which mpopt_kernels does not list",
                    m.name()
                );
            }
        }
        let mut names: Vec<&str> = ALL_KERNELS.iter().map(|k| k.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ALL_KERNELS.len(), "kernel names are unique");
    }

    #[test]
    fn element_codes_match_the_prelude() {
        for (name, e) in [
            ("T_F32", Elem::F32),
            ("T_F16", Elem::F16),
            ("T_BF16", Elem::BF16),
        ] {
            let line = PRELUDE
                .lines()
                .find(|l| l.starts_with(&format!("#define {name} ")))
                .unwrap_or_else(|| panic!("{name} is not defined in the prelude"));
            let v: i32 = line.rsplit(' ').next().unwrap().parse().unwrap();
            assert_eq!(v, e as i32, "{name}");
        }
    }

    /// The `case N: ... // Name` comments of a switch, as (N, Name).
    fn cases(src: &str, func: &str) -> Vec<(i32, String)> {
        let start = src.find(func).unwrap_or_else(|| panic!("{func} not found"));
        let body = &src[start..];
        let body = &body[..body.find("default:").unwrap()];
        body.lines()
            .filter_map(|l| {
                let l = l.trim();
                let n: i32 = l.strip_prefix("case ")?.split(':').next()?.parse().ok()?;
                let name = l.split("// ").nth(1)?.split(['(', ' ']).next()?.to_string();
                Some((n, name))
            })
            .collect()
    }

    #[test]
    fn unary_codes_match_the_switch() {
        let src = Module::Elementwise.file_source();
        let all = [
            Unary::Relu,
            Unary::Sigmoid,
            Unary::Tanh,
            Unary::Exp,
            Unary::Log,
            Unary::Sqrt,
            Unary::Neg,
            Unary::Abs,
            Unary::Erf,
            Unary::Reciprocal,
            Unary::Clip,
            Unary::HardSigmoid,
            Unary::LeakyRelu,
            Unary::Gelu,
            Unary::HardSwish,
            Unary::Floor,
            Unary::Ceil,
            Unary::Sin,
            Unary::Cos,
            Unary::Identity,
        ];
        let cases = cases(src, "float unary_op(");
        assert_eq!(cases.len(), all.len());
        for u in all {
            let (_, name) = cases.iter().find(|(n, _)| *n == u as i32).unwrap();
            assert_eq!(name, &format!("{u:?}"), "case {}", u as i32);
        }
    }

    #[test]
    fn sources_have_the_prelude_first() {
        for m in Module::ALL {
            let s = m.source();
            assert!(s.starts_with(PRELUDE));
            assert!(s.contains(m.file_source()));
            assert!(
                !m.file_source().contains("#include"),
                "{}.cu must not include headers: NVRTC gets no include path",
                m.name()
            );
        }
    }
}
