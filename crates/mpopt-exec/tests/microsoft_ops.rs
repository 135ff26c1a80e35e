//! The fused ops onnxruntime's optimizer writes (com.microsoft FusedConv, FusedMatMul, QuickGelu, BiasGelu,
//! Gelu, FastGelu, SkipLayerNormalization, SkipSimplifiedLayerNormalization; SimplifiedLayerNormalization and
//! LayerNormalization before opset 17 in the default domain), each against the standard ops it replaces, run
//! by the same executor on pseudo-random data. `tests/py/exec_check.py` on onnxruntime-optimized corpus models
//! checks them against onnxruntime itself.

use mpopt_exec::Tensor;

mod common;
use common::{Rng, run_text, run_text_err};

fn model(opset: u32, params: &str, outs: &str, body: &str) -> String {
    format!(
        "ir_version 8\nopset ai.onnx {opset}, com.microsoft 1\n\ngraph @g({params}) -> ({outs}) {{\n{body}\n}}\n"
    )
}

fn close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
    assert_eq!(a.shape, b.shape, "{what}: shape");
    let (x, y) = (a.to_f32s().unwrap(), b.to_f32s().unwrap());
    for (i, (p, q)) in x.iter().zip(&y).enumerate() {
        assert!(
            (p - q).abs() <= tol * (1.0 + q.abs()),
            "{what}: element {i}: {p} vs {q}"
        );
    }
}

fn t(shape: &[usize], rng: &mut Rng) -> Tensor {
    Tensor::f32(shape.to_vec(), rng.vals(shape.iter().product()))
}

#[test]
fn fused_conv_is_conv_plus_z_then_the_activation() {
    let mut rng = Rng(7);
    let (x, w, b, z) = (
        t(&[1, 3, 6, 6], &mut rng),
        t(&[4, 3, 3, 3], &mut rng),
        t(&[4], &mut rng),
        t(&[1, 4, 6, 6], &mut rng),
    );
    let params = "%x: f32[1,3,6,6], %w: f32[4,3,3,3], %b: f32[4], %z: f32[1,4,6,6]";
    let ins = || {
        vec![
            ("x", x.clone()),
            ("w", w.clone()),
            ("b", b.clone()),
            ("z", z.clone()),
        ]
    };
    for (act, attrs, standard) in [
        ("Relu", "", "%y = Relu(%s)"),
        ("Tanh", "", "%y = Tanh(%s)"),
        ("Sigmoid", "", "%y = Sigmoid(%s)"),
        (
            "LeakyRelu",
            ", activation_params = [0.1]",
            "%y = LeakyRelu(%s) {alpha = 0.1}",
        ),
        (
            "HardSigmoid",
            ", activation_params = [0.2, 0.5]",
            "%y = HardSigmoid(%s) {alpha = 0.2, beta = 0.5}",
        ),
    ] {
        let fused = model(
            13,
            params,
            "%y: f32[1,4,6,6]",
            &format!(
                "  %y = com.microsoft::FusedConv(%x, %w, %b, %z) {{activation = \"{act}\"{attrs}, pads = [1, 1, 1, 1]}}"
            ),
        );
        let plain = model(
            13,
            params,
            "%y: f32[1,4,6,6]",
            &format!(
                "  %c = Conv(%x, %w, %b) {{pads = [1, 1, 1, 1]}}\n  %s = Add(%c, %z)\n  {standard}"
            ),
        );
        close(
            &run_text(&fused, ins())[0],
            &run_text(&plain, ins())[0],
            1e-5,
            act,
        );
    }
    // Clip's bounds come from activation_params
    let fused = model(
        13,
        "%x: f32[1,3,6,6], %w: f32[4,3,3,3]",
        "%y: f32[1,4,4,4]",
        "  %y = com.microsoft::FusedConv(%x, %w) {activation = \"Clip\", activation_params = [-1.0, 2.0]}",
    );
    let y = &run_text(&fused, vec![("x", x.clone()), ("w", w.clone())])[0];
    let v = y.to_f32s().unwrap();
    assert!(v.iter().all(|&e| (-1.0..=2.0).contains(&e)));
    assert!(v.contains(&-1.0) && v.contains(&2.0), "the bounds bite");
    let bad = model(
        13,
        "%x: f32[1,3,6,6], %w: f32[4,3,3,3]",
        "%y: f32[1,4,4,4]",
        "  %y = com.microsoft::FusedConv(%x, %w) {activation = \"Swish\"}",
    );
    let e = run_text_err(&bad, vec![("x", x), ("w", w)]);
    assert!(e.contains("unknown activation 'Swish'"), "{e}");
}

#[test]
fn fused_matmul_transposes_and_scales() {
    let mut rng = Rng(11);
    let (a, b) = (t(&[2, 5, 3], &mut rng), t(&[2, 4, 5], &mut rng));
    let fused = model(
        13,
        "%a: f32[2,5,3], %b: f32[2,4,5]",
        "%y: f32[2,3,4]",
        "  %y = com.microsoft::FusedMatMul(%a, %b) {alpha = 0.5, transA = 1, transB = 1}",
    );
    let plain = model(
        13,
        "%a: f32[2,5,3], %b: f32[2,4,5]",
        "%y: f32[2,3,4]",
        "  %at = Transpose(%a) {perm = [0, 2, 1]}\n  %bt = Transpose(%b) {perm = [0, 2, 1]}\n  %m = MatMul(%at, %bt)\n  %h = Constant() {value = tensor f32[] [0.5]}\n  %y = Mul(%m, %h)",
    );
    let ins = || vec![("a", a.clone()), ("b", b.clone())];
    close(
        &run_text(&fused, ins())[0],
        &run_text(&plain, ins())[0],
        1e-5,
        "FusedMatMul",
    );
    let batch = model(
        13,
        "%a: f32[2,5,3], %b: f32[2,4,5]",
        "%y: f32[...]",
        "  %y = com.microsoft::FusedMatMul(%a, %b) {transBatchA = 1}",
    );
    let e = run_text_err(&batch, ins());
    assert!(e.contains("transBatchA = 1 is not supported"), "{e}");
}

#[test]
fn gelu_family_matches_the_standard_formulas() {
    let mut rng = Rng(3);
    let (x, bias) = (t(&[3, 8], &mut rng), t(&[8], &mut rng));
    let ins = || vec![("x", x.clone()), ("bias", bias.clone())];
    let params = "%x: f32[3,8], %bias: f32[8]";
    for (fused, plain) in [
        (
            "  %y = com.microsoft::QuickGelu(%x) {alpha = 1.5}",
            "  %a = Constant() {value = tensor f32[] [1.5]}\n  %s = Mul(%x, %a)\n  %g = Sigmoid(%s)\n  %y = Mul(%x, %g)",
        ),
        (
            "  %y = com.microsoft::BiasGelu(%x, %bias)",
            "  %s = Add(%x, %bias)\n  %y = Gelu(%s)",
        ),
        ("  %y = com.microsoft::Gelu(%x)", "  %y = Gelu(%x)"),
        (
            "  %y = com.microsoft::FastGelu(%x, %bias)",
            "  %s = Add(%x, %bias)\n  %y = Gelu(%s) {approximate = \"tanh\"}",
        ),
    ] {
        let f = run_text(&model(20, params, "%y: f32[3,8]", fused), ins());
        let p = run_text(&model(20, params, "%y: f32[3,8]", plain), ins());
        close(&f[0], &p[0], 1e-5, fused);
    }
}

#[test]
fn skip_normalizations_normalize_the_sum_and_return_it() {
    let mut rng = Rng(5);
    let (x, skip, g, b, bias) = (
        t(&[2, 3, 8], &mut rng),
        t(&[2, 3, 8], &mut rng),
        t(&[8], &mut rng),
        t(&[8], &mut rng),
        t(&[8], &mut rng),
    );
    let params = "%x: f32[2,3,8], %skip: f32[2,3,8], %g: f32[8], %b: f32[8], %bias: f32[8]";
    let ins = || {
        vec![
            ("x", x.clone()),
            ("skip", skip.clone()),
            ("g", g.clone()),
            ("b", b.clone()),
            ("bias", bias.clone()),
        ]
    };
    let outs = "%y: f32[2,3,8], %sum: f32[2,3,8]";
    let fused = model(
        17,
        params,
        outs,
        "  %y, %mean, %inv, %sum = com.microsoft::SkipLayerNormalization(%x, %skip, %g, %b, %bias) {epsilon = 1e-5}",
    );
    let plain = model(
        17,
        params,
        outs,
        "  %s = Add(%x, %skip)\n  %sum = Add(%s, %bias)\n  %y = LayerNormalization(%sum, %g, %b) {epsilon = 1e-5}",
    );
    let (f, p) = (run_text(&fused, ins()), run_text(&plain, ins()));
    close(&f[0], &p[0], 1e-5, "SkipLayerNormalization");
    close(&f[1], &p[1], 0.0, "SkipLayerNormalization sum");
    // the RMS version, and onnxruntime's SimplifiedLayerNormalization, against RMSNormalization (opset 23)
    let fused = model(
        23,
        params,
        outs,
        "  %y, %mean, %inv, %sum = com.microsoft::SkipSimplifiedLayerNormalization(%x, %skip, %g, %bias) {epsilon = 1e-5}",
    );
    let plain = model(
        23,
        params,
        outs,
        "  %s = Add(%x, %skip)\n  %sum = Add(%s, %bias)\n  %y = RMSNormalization(%sum, %g) {epsilon = 1e-5}",
    );
    let (f, p) = (run_text(&fused, ins()), run_text(&plain, ins()));
    close(&f[0], &p[0], 1e-5, "SkipSimplifiedLayerNormalization");
    close(&f[1], &p[1], 0.0, "SkipSimplifiedLayerNormalization sum");
    let simplified = model(
        12,
        "%x: f32[2,3,8], %g: f32[8]",
        "%y: f32[2,3,8]",
        "  %y = SimplifiedLayerNormalization(%x, %g) {epsilon = 1e-5}",
    );
    let rms = model(
        23,
        "%x: f32[2,3,8], %g: f32[8]",
        "%y: f32[2,3,8]",
        "  %y = RMSNormalization(%x, %g) {epsilon = 1e-5}",
    );
    let ins2 = || vec![("x", x.clone()), ("g", g.clone())];
    close(
        &run_text(&simplified, ins2())[0],
        &run_text(&rms, ins2())[0],
        1e-5,
        "SimplifiedLayerNormalization",
    );
    // LayerNormalization at opset 12: onnxruntime's default-domain op, the same computation as ONNX's 17
    let ln = |opset| {
        model(
            opset,
            "%x: f32[2,3,8], %g: f32[8]",
            "%y: f32[2,3,8]",
            "  %y = LayerNormalization(%x, %g) {epsilon = 1e-5}",
        )
    };
    close(
        &run_text(&ln(12), ins2())[0],
        &run_text(&ln(17), ins2())[0],
        0.0,
        "LayerNormalization 1",
    );
}
