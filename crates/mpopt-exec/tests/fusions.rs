//! The executor's plan-time fusions (channels-last convolution between two transposes, elementwise chains)
//! against the same executor running the nodes one by one: a run that keeps every intermediate value
//! (`keep_all`) never fuses. Chains must agree bit for bit; a convolution sums its terms in another order,
//! so it agrees to f32 rounding. A profile shows which steps ran fused.

use mpopt_exec::{Executor, RunOptions, Tensor, Value, cast_tensor};
use mpopt_ir::DType;
use mpopt_ir::text::parse_model;

mod common;
use common::{Rng, dims};

fn list(v: &[f32]) -> String {
    v.iter()
        .map(|x| format!("{x:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs the model fused (plain run, profiled) and unfused (keep_all); returns both outputs `%y` and the
/// profile's step names.
fn both(src: &str, inputs: &[(&str, Tensor)]) -> (Tensor, Tensor, Vec<String>) {
    let m = parse_model(src).unwrap_or_else(|e| panic!("{src}\n{e}"));
    let exec = Executor::new(&m).unwrap();
    let ins = || {
        inputs
            .iter()
            .map(|(n, t)| (n.to_string(), Value::Tensor(t.clone())))
            .collect::<Vec<_>>()
    };
    let fast = exec
        .run(
            ins(),
            &RunOptions {
                profile: true,
                ..Default::default()
            },
        )
        .unwrap();
    let plain = exec
        .run(
            ins(),
            &RunOptions {
                keep_all: true,
                ..Default::default()
            },
        )
        .unwrap();
    let steps = fast.profile.iter().map(|p| p.0.clone()).collect();
    let t = |o: &[(String, Value)]| o[0].1.tensor().unwrap().clone();
    (t(&fast.outputs), t(&plain.outputs), steps)
}

#[test]
fn channels_last_conv_matches_transpose_conv_transpose() {
    // In f32, and in f16 and bf16 as a converted model runs in the GPU-faithful mode (the weight widened
    // once at plan time, the input widened, the result rounded once, as the unfused Conv does).
    for (t, tol) in [
        ("f32", 1e-5),
        ("f16", 2f32.powi(-10)),
        ("bf16", 2f32.powi(-7)),
    ] {
        let mut rng = Rng(11);
        let mut fused_runs = 0;
        for case in 0..24 {
            let (n, c, m) = (1 + rng.below(2), 1 + rng.below(6), 1 + rng.below(7));
            let (h, w) = (3 + rng.below(12), 3 + rng.below(12));
            let (k, s, d, p) = rng.window2(3);
            if h + p[0] + p[2] < (k[0] - 1) * d[0] + 1 || w + p[1] + p[3] < (k[1] - 1) * d[1] + 1 {
                continue;
            }
            let wv = rng.vals(m * c * k[0] * k[1]);
            let bias = case % 2 == 0;
            let b_line = if bias {
                format!("  %b = const {t}[{m}] [{}]\n", list(&rng.vals(m)))
            } else {
                String::new()
            };
            let src = format!(
                "ir_version 8\nopset ai.onnx 19\n\ngraph @g(%x: {t}[{n},{h},{w},{c}]) -> (%y: {t}[...]) {{\n\
                 \x20 %w = const {t}[{m},{c},{},{}] [{}]\n{b_line}\
                 \x20 %t = Transpose(%x) {{perm = [0, 3, 1, 2]}}\n\
                 \x20 %o = Conv(%t, %w{}) {{strides = [{}], dilations = [{}], pads = [{}]}}\n\
                 \x20 %y = Transpose(%o) {{perm = [0, 2, 3, 1]}}\n}}\n",
                k[0],
                k[1],
                list(&wv),
                if bias { ", %b" } else { "" },
                dims(&s),
                dims(&d),
                dims(&p),
            );
            let x = typed(t, &[n, h, w, c], rng.vals(n * h * w * c));
            let (fast, plain, steps) = both(&src, &[("x", x)]);
            let what = format!("{t} case {case}");
            assert_eq!(fast.shape, plain.shape, "{what}");
            assert_eq!(fast.dtype().short_name(), t, "{what}");
            assert_eq!(plain.dtype().short_name(), t, "{what}");
            assert!(
                steps.iter().any(|s| s.starts_with("Conv (channels-last")),
                "{what}: not fused: {steps:?}"
            );
            assert!(!steps.iter().any(|s| s == "Transpose"), "{what}");
            fused_runs += 1;
            // The sums differ in order only: in a half type, rounding them apart moves a result by at most
            // one unit in the last place.
            let (a, b) = (fast.to_f32s().unwrap(), plain.to_f32s().unwrap());
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert!(
                    (x - y).abs() <= tol * (1.0 + y.abs()),
                    "{what} element {i}: fused {x}, unfused {y}"
                );
            }
        }
        assert!(fused_runs >= 12, "{t}");
    }
}

#[test]
fn conv_whose_transposed_input_has_other_readers_is_not_fused() {
    let src = "ir_version 8\nopset ai.onnx 19\n\ngraph @g(%x: f32[1,4,4,2]) -> (%y: f32[...], %t: f32[...]) {\n\
               \x20 %w = const f32[3,2,1,1] [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]\n\
               \x20 %t = Transpose(%x) {perm = [0, 3, 1, 2]}\n\
               \x20 %o = Conv(%t, %w)\n\
               \x20 %y = Transpose(%o) {perm = [0, 2, 3, 1]}\n}\n";
    let x = Tensor::f32(vec![1, 4, 4, 2], (0..32).map(|v| v as f32).collect());
    let (fast, plain, steps) = both(src, &[("x", x)]);
    assert!(steps.iter().any(|s| s == "Conv"), "{steps:?}");
    assert_eq!(fast.to_f32s().unwrap(), plain.to_f32s().unwrap());
}

/// A chain over `%x: f32[shape]`: every operand pattern (scalar, trailing vector, per-channel block, same
/// shape, the running value on either side), `BatchNormalization`, `Clip` with two and one bound, `Relu`,
/// `Identity` and `Cast(to=FLOAT)`.
fn chain_src(shape: &[usize], extra: &str, rng: &mut Rng) -> String {
    typed_chain_src(shape, extra, "f32", true, rng)
}

/// [`chain_src`] with the head's values of type `t` (`f32`, `f16` or `bf16`; BatchNormalization's mean and
/// variance stay f32, as its schema allows). `cast`: the `Cast(to=FLOAT)` makes the rest of the chain f32;
/// otherwise it is an `Identity` and the whole chain, output included, has type `t`.
fn typed_chain_src(shape: &[usize], extra: &str, t: &str, cast: bool, rng: &mut Rng) -> String {
    let c = shape[1];
    let last = *shape.last().unwrap();
    let tail = if cast { "f32" } else { t };
    let widen = if cast {
        "Cast(%a5) {to = 1}"
    } else {
        "Identity(%a5)"
    };
    format!(
        "ir_version 8\nopset ai.onnx 19\n\ngraph @g(%x: {t}[{s}], %r: {tail}[{s}], %e: {tail}[{extra}]) -> (%y: {tail}[...]) {{\n\
         \x20 %c = const {t}[{c},1,1] [{c1}]\n\
         \x20 %ct = const {tail}[{c},1,1] [{c1}]\n\
         \x20 %v = const {t}[{last}] [{}]\n\
         \x20 %k = const {t}[] [0.75]\n\
         \x20 %sc = const {t}[{c}] [{}]\n\
         \x20 %bi = const {t}[{c}] [{}]\n\
         \x20 %me = const f32[{c}] [{}]\n\
         \x20 %va = const f32[{c}] [{}]\n\
         \x20 %lo = const {t}[] [-0.5]\n\
         \x20 %hi = const {t}[] [3.0]\n\
         \x20 %a0 = BatchNormalization(%x, %sc, %bi, %me, %va) {{epsilon = 0.001}}\n\
         \x20 %a1 = Add(%a0, %c)\n\
         \x20 %a2 = Sub(%v, %a1)\n\
         \x20 %a3 = Mul(%a2, %k)\n\
         \x20 %a3c = Clip(%a3, %lo, %hi)\n\
         \x20 %a3d = Clip(%a3c, %lo)\n\
         \x20 %a4 = Relu(%a3d)\n\
         \x20 %a5 = Div(%k, %a4)\n\
         \x20 %a6 = {widen}\n\
         \x20 %a7 = Identity(%a6)\n\
         \x20 %a8 = Add(%r, %a7)\n\
         \x20 %a9 = Div(%a8, %ct)\n\
         \x20 %y = Mul(%a9, %e)\n}}\n",
        list(&rng.vals(last)),
        list(&rng.vals(c)),
        list(&rng.vals(c)),
        list(&rng.vals(c)),
        list(
            &rng.vals(c)
                .iter()
                .map(|v| v.abs() + 0.1)
                .collect::<Vec<_>>()
        ),
        c1 = list(&rng.vals(c)),
        s = dims(shape),
    )
}

fn same_bits(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.shape, b.shape, "{what}");
    for (i, (x, y)) in a
        .to_f32s()
        .unwrap()
        .iter()
        .zip(&b.to_f32s().unwrap())
        .enumerate()
    {
        assert!(
            x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
            "{what}: element {i}: fused {x}, unfused {y}"
        );
    }
}

#[test]
fn elementwise_chains_are_bit_identical_to_their_nodes() {
    let mut rng = Rng(5);
    // Big enough for several parallel blocks, and a block edge inside a channel.
    let shape = [2, 3, 37, 101];
    let n: usize = shape.iter().product();
    let src = chain_src(&shape, "1", &mut rng);
    let x = Tensor::f32(shape.to_vec(), rng.vals(n));
    let r = Tensor::f32(shape.to_vec(), rng.vals(n));
    let e = Tensor::f32(vec![1], vec![-1.25]);
    let (fast, plain, steps) = both(&src, &[("x", x), ("r", r), ("e", e)]);
    assert!(
        steps.iter().any(|s| s.starts_with("elementwise chain")),
        "{steps:?}"
    );
    // One step: no node ran on its own.
    assert_eq!(steps.len(), 1, "{steps:?}");
    same_bits(&fast, &plain, "chain");
}

#[test]
fn chains_whose_operands_do_not_fit_run_node_by_node() {
    let mut rng = Rng(9);
    let shape = [2, 3, 5, 7];
    let n: usize = shape.iter().product();
    // %e broadcasts over dims 0 and 2 at once: not a pattern the fused kernel covers.
    let src = chain_src(&shape, "2,1,5,1", &mut rng);
    let x = Tensor::f32(shape.to_vec(), rng.vals(n));
    let r = Tensor::f32(shape.to_vec(), rng.vals(n));
    let e = Tensor::f32(vec![2, 1, 5, 1], rng.vals(10));
    let (fast, plain, _) = both(&src, &[("x", x.clone()), ("r", r.clone()), ("e", e)]);
    same_bits(&fast, &plain, "fallback");
    // %e broadcasts the running value up: the result is bigger than %x.
    let src = chain_src(&shape, "3,2,3,5,7", &mut rng);
    let e = Tensor::f32(vec![3, 2, 3, 5, 7], rng.vals(3 * n));
    let (fast, plain, _) = both(&src, &[("x", x), ("r", r), ("e", e)]);
    assert_eq!(fast.shape, [3, 2, 3, 5, 7]);
    same_bits(&fast, &plain, "broadcast up");
}

/// A tensor of `t` (`f32`, `f16` or `bf16`) holding `v` rounded to it.
fn typed(t: &str, shape: &[usize], v: Vec<f32>) -> Tensor {
    let to = DType::from_short_name(t).expect("a dtype name");
    cast_tensor(&Tensor::f32(shape.to_vec(), v), to).expect("a float cast")
}

#[test]
fn half_chains_are_bit_identical_to_their_nodes() {
    // The GPU-faithful mode rounds every node's result to its half type: the fused chain must round after
    // each op exactly as the nodes do, and widen for good at a Cast(to=FLOAT).
    let mut rng = Rng(21);
    let shape = [2, 3, 37, 101];
    let n: usize = shape.iter().product();
    for t in ["f16", "bf16"] {
        for cast in [true, false] {
            let tail = if cast { "f32" } else { t };
            let src = typed_chain_src(&shape, "1", t, cast, &mut rng);
            let x = typed(t, &shape, rng.vals(n));
            // Values near the half range's top, so that the rounding after an op overflows to infinity
            // somewhere, as it would in the unfused chain.
            let mut rv = rng.vals(n);
            rv.iter_mut().step_by(7).for_each(|v| *v *= 16000.0);
            let r = typed(tail, &shape, rv);
            let e = typed(tail, &[1], vec![-1.25]);
            let (fast, plain, steps) = both(&src, &[("x", x), ("r", r), ("e", e)]);
            let what = format!("{t} chain, cast {cast}");
            assert_eq!(steps.len(), 1, "{what}: {steps:?}");
            assert!(
                steps[0].starts_with("elementwise chain"),
                "{what}: {steps:?}"
            );
            assert_eq!(fast.dtype(), plain.dtype(), "{what}");
            assert_eq!(fast.dtype().short_name(), tail, "{what}");
            same_bits(&fast, &plain, &what);
        }
    }
}

#[test]
fn half_chains_with_an_operand_of_another_type_run_node_by_node() {
    // An f16 chain whose scalar operand is f32 (a model the checker rejects, which the executor still
    // runs): the fused kernel leaves it to the nodes, which say what they make of it.
    let src = "ir_version 8\nopset ai.onnx 19\n\ngraph @g(%x: f16[4], %k: f32[]) -> (%y: f16[...]) {\n\
               \x20 %a = Relu(%x)\n\
               \x20 %y = Mul(%a, %k)\n}\n";
    let m = parse_model(src).unwrap();
    let exec = Executor::new(&m).unwrap();
    let ins = vec![
        (
            "x".to_string(),
            Value::Tensor(typed("f16", &[4], vec![1.0, -2.0, 3.0, 4.0])),
        ),
        (
            "k".to_string(),
            Value::Tensor(Tensor::f32(vec![], vec![0.5])),
        ),
    ];
    let fused = exec.run(ins.clone(), &RunOptions::default());
    let plain = exec.run(
        ins,
        &RunOptions {
            keep_all: true,
            ..Default::default()
        },
    );
    match (fused, plain) {
        (Ok(a), Ok(b)) => same_bits(
            a.outputs[0].1.tensor().unwrap(),
            b.outputs[0].1.tensor().unwrap(),
            "mixed operand",
        ),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        (a, b) => panic!("fused {:?}, unfused {:?}", a.is_ok(), b.is_ok()),
    }
}
