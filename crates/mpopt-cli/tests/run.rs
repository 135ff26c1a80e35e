//! `mpopt run` and `mpopt compare` on a testdata model.

mod common;

use common::{mpopt, root};
use mpopt_exec::Tensor;

/// `mpopt run` on testdata's tiny_mlp with these inputs and further arguments.
fn run_mlp(inputs: &str, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec!["run", "testdata/models/tiny_mlp.onnx", "--inputs", inputs];
    args.extend_from_slice(extra);
    mpopt(&args)
}

fn inputs(dir: &std::path::Path, name: &str, rows: usize) -> String {
    let x: Vec<f32> = (0..rows * 16)
        .map(|i| ((i * 7 % 13) as f32 - 6.0) / 3.0)
        .collect();
    let t = Tensor::f32(vec![rows, 16], x);
    let p = dir.join("in.npz");
    mpopt_exec::io::write_npz(&p, &[(name.to_string(), &t)]).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn run_writes_outputs_that_a_user_can_check() {
    let dir = tempfile::tempdir().unwrap();
    let input = inputs(dir.path(), "x", 3);
    let out = dir.path().join("out.npz");
    let (code, _, err) = run_mlp(&input, &["-o", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("y: f32[3, 4] nan=0 inf=0"), "{err}");
    let back = mpopt_exec::io::read_npz(&out).unwrap();
    assert_eq!(back[0].0, "y");
    let y = back[0].1.to_f32s().unwrap();
    // Softmax rows: positive, summing to one.
    for row in y.chunks(4) {
        assert!(row.iter().all(|&p| p > 0.0));
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{row:?}");
    }
}

#[test]
fn compare_passes_within_tolerance_and_fails_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let input = inputs(dir.path(), "x", 4);
    let low = dir.path().join("low.onnx");
    let (code, _, err) = mpopt(&["testdata/models/tiny_mlp.onnx", "-o", low.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let low = low.to_str().unwrap();
    let (code, out, err) = mpopt(&[
        "compare",
        "testdata/models/tiny_mlp.onnx",
        low,
        "--inputs",
        &input,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("ok   y: f32 -> f32 [4, 4]")
            && out.contains("cosine")
            && out.contains("top1 4/4"),
        "{out}"
    );
    // fp16 rounding is visible on the GPU-faithful executor: zero tolerance fails, exit 1, and --per-node
    // names the first value that diverges.
    let (code, out, err) = mpopt(&[
        "compare",
        "testdata/models/tiny_mlp.onnx",
        low,
        "--inputs",
        &input,
        "--rtol",
        "0",
        "--atol",
        "0",
        "--per-node",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL y") && out.contains("per node: first diverging values"),
        "{out}"
    );
    assert!(
        err.contains("differ from the reference past the tolerances"),
        "{err}"
    );
}

#[test]
fn bad_inputs_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let wrong = inputs(dir.path(), "z", 2);
    let (code, _, err) = run_mlp(&wrong, &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("unknown input 'z'") && err.contains("'x' f32[N,16]"),
        "{err}"
    );
    let missing = dir.path().join("nope.npz");
    let (code, _, err) = run_mlp(missing.to_str().unwrap(), &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("nope.npz") && err.contains("cannot open"),
        "{err}"
    );
    // Writing the outputs over the model is refused.
    let input = inputs(dir.path(), "x", 2);
    let model = root().join("testdata/models/tiny_mlp.onnx");
    let (code, _, err) = run_mlp(&input, &["-o", model.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn calibration_and_ranges_reach_the_report_and_the_printout() {
    let dir = tempfile::tempdir().unwrap();
    let calib = inputs(dir.path(), "x", 4);
    let out = dir.path().join("low.onnx");
    let report = dir.path().join("r.json");
    let (code, _, err) = mpopt(&[
        "testdata/models/tiny_mlp.onnx",
        "-o",
        out.to_str().unwrap(),
        "--calib",
        &calib,
        "--report",
        report.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("% of FLOPs low"), "{err}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let passes: Vec<&str> = r["passes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(passes.contains(&"calibrate"), "{passes:?}");
    // every decided node's values carry the observed range, and the observations are consistent
    let nodes = r["nodes"].as_array().unwrap();
    let observed: Vec<&serde_json::Value> = nodes
        .iter()
        .filter_map(|n| n["ranges"].as_object())
        .flat_map(|m| m.values())
        .filter_map(|v| v.get("observed"))
        .collect();
    assert!(!observed.is_empty());
    for o in observed {
        let (lo, hi, am) = (
            o["min"].as_f64().unwrap(),
            o["max"].as_f64().unwrap(),
            o["abs_max"].as_f64().unwrap(),
        );
        assert!(lo <= hi && am == lo.abs().max(hi.abs()), "{o}");
    }
    // the printout shows proven and observed ranges beside the values
    let (code, text, err) = mpopt(&[
        "print",
        "testdata/models/tiny_mlp.onnx",
        "--ranges",
        "--input-range",
        "x=-1:1",
        "--calib",
        &calib,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("; range %x [-1, 1] obs ["), "{text}");
    assert!(
        text.lines().filter(|l| l.contains(" ; range [")).count() >= 3,
        "{text}"
    );
}

#[test]
fn tolerance_search_meets_its_budget_and_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let calib = inputs(dir.path(), "x", 6);
    let out = dir.path().join("low.onnx");
    let report = dir.path().join("r.json");
    let (code, _, err) = mpopt(&[
        "testdata/models/tiny_mlp.onnx",
        "-o",
        out.to_str().unwrap(),
        "--calib",
        &calib,
        "--tolerance",
        "max-abs=0.01",
        "--tolerance",
        "top1=1",
        "--report",
        report.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("max-abs@y = "), "{err}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let search = r["search"].as_array().unwrap();
    let checks: Vec<&serde_json::Value> = search
        .iter()
        .filter(|x| x["kind"] == "search-check")
        .collect();
    assert!(!checks.is_empty(), "{search:?}");
    assert_eq!(checks.last().unwrap()["pass"], "true", "{search:?}");
    assert!(search.iter().any(|x| x["kind"] == "search-cost"));
    // the written model meets the budget on the same inputs, checked independently
    let json = dir.path().join("m.json");
    let (code, _, err) = mpopt(&[
        "compare",
        "testdata/models/tiny_mlp.onnx",
        out.to_str().unwrap(),
        "--inputs",
        &calib,
        "--json",
        json.to_str().unwrap(),
        "--rtol",
        "1",
        "--atol",
        "1",
    ]);
    assert_eq!(code, 0, "{err}");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(m[0]["max_abs"].as_f64().unwrap() <= 0.01, "{m}");
    assert_eq!(m[0]["top1"][0], m[0]["top1"][1], "{m}");
}

#[test]
fn tolerance_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("low.onnx");
    let calib = inputs(dir.path(), "x", 2);
    let empty_dir = dir.path().join("empty");
    std::fs::create_dir(&empty_dir).unwrap();
    let empty = inputs(&empty_dir, "x", 0);
    for (args, want) in [
        (vec!["--tolerance", "cosine=0.99"], "needs inputs"),
        (
            vec!["--calib", calib.as_str(), "--tolerance", "cosine=1"],
            "exclusive",
        ),
        (
            vec!["--calib", calib.as_str(), "--tolerance", "mse=1"],
            "unknown metric 'mse'",
        ),
        (
            vec![
                "--calib",
                calib.as_str(),
                "--tolerance",
                "cosine@logits=0.99",
            ],
            "has no output 'logits'; its outputs are: y",
        ),
        // an empty batch: nothing to judge (top-1 would fail on 0 rows, cosine hold on nothing)
        (
            vec!["--calib", empty.as_str(), "--tolerance", "top1=1"],
            "output 'y' has no elements on the calibration inputs",
        ),
        (
            vec!["--calib", empty.as_str(), "--tolerance", "cosine=0.99"],
            "output 'y' has no elements on the calibration inputs",
        ),
    ] {
        let mut all = vec!["testdata/models/tiny_mlp.onnx", "-o", out.to_str().unwrap()];
        all.extend(args);
        let (code, _, err) = mpopt(&all);
        assert_ne!(code, 0, "{all:?}");
        assert!(err.contains(want), "{all:?}: {err}");
        assert!(!out.exists(), "no partial output");
    }
}

#[test]
fn the_device_path_matches_the_cpu_on_fp32_and_mixed_models() {
    let dir = tempfile::tempdir().unwrap();
    let input = inputs(dir.path(), "x", 512);
    let low = dir.path().join("low.onnx");
    let (code, _, err) = mpopt(&["testdata/models/tiny_mlp.onnx", "-o", low.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    for (model, tol) in [
        ("testdata/models/tiny_mlp.onnx", "1e-5"),
        (low.to_str().unwrap(), "1e-3"),
    ] {
        let (code, out, err) = mpopt(&[
            "compare", model, model, "--inputs", &input, "--device", "emu", "--rtol", tol,
            "--atol", "1e-6",
        ]);
        assert_eq!(code, 0, "{model}: {out}{err}");
        // 512 rows x 16 inputs is over the host limit: the nodes run on the (emulated) device
        assert!(out.contains("candidate on emulator"), "{out}");
        assert!(
            out.contains("no CPU fallback") && out.contains("ok   y: "),
            "{out}"
        );
        let dev: usize = out
            .split(" nodes on the device")
            .next()
            .and_then(|s| s.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        assert!(dev >= 4, "{out}");
    }
    // --batch tiles the inputs: 3 x 512 rows
    let (code, _, err) = run_mlp(&input, &["--device", "emu", "--batch", "3"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("y: f32[1536, 4]"), "{err}");
}

#[test]
fn cuda_without_a_driver_is_a_clear_error() {
    if mpopt_cuda_present() {
        eprintln!("SKIP: this machine has a CUDA driver");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let input = inputs(dir.path(), "x", 2);
    let (code, _, err) = run_mlp(&input, &["--device", "cuda"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("--device cuda") && err.contains("libcuda.so") && !err.contains("panicked"),
        "{err}"
    );
}

/// Whether libcuda can be loaded here (the same probe the executor uses).
fn mpopt_cuda_present() -> bool {
    ["libcuda.so", "libcuda.so.1"].iter().any(|l| {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("ldconfig -p 2>/dev/null | grep -q '{l}'"))
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    })
}

#[test]
fn gemm_profile_times_the_device_gemms_per_shape() {
    let dir = tempfile::tempdir().unwrap();
    // rows enough that the products run on the (emulated) device, not as small host nodes
    let input = inputs(dir.path(), "x", 2048);
    let json = dir.path().join("gemm.json");
    let (code, _, err) = run_mlp(
        &input,
        &["--device", "emu", "--gemm-profile", json.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("GEMMs: 2 shapes"), "{err}");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let mut shapes: Vec<(u64, u64, u64, u64)> = j["gemms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            assert_eq!(g["type"], "f32");
            assert!(g["ms"].as_f64().unwrap() > 0.0 && g["tflops"].as_f64().unwrap() > 0.0);
            let u = |k: &str| g[k].as_u64().unwrap();
            (u("m"), u("n"), u("k"), u("calls"))
        })
        .collect();
    shapes.sort();
    // x[2048,16] @ w1[16,32] and h[2048,32] @ w2[32,4], in cuBLAS's column-major terms, once each
    assert_eq!(shapes, [(4, 2048, 32, 1), (32, 2048, 16, 1)], "{j}");
    assert!(j["total_ms"].as_f64().unwrap() > 0.0);
    // the CPU has no GEMM path to time
    let (code, _, err) = run_mlp(&input, &["--gemm-profile", json.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--gemm-profile needs --device cuda"), "{err}");
}
