//! The `mpopt` binary as a user runs it: snapshots of `inspect` and `print` on testdata/ models, lossless
//! `copy`, and every kind of bad input with its exact message, exit code, and no output left behind.

mod common;

use common::{mpopt, root};

const MODELS: &[&str] = &[
    "testdata/models/tiny_mlp.onnx",
    "testdata/models/if_outer.onnx",
    "testdata/models/loop_carried.onnx",
    "testdata/models/with_function.onnx",
    "testdata/models/external/model.onnx",
];

fn snap_name(model: &str) -> String {
    model
        .trim_start_matches("testdata/models/")
        .trim_end_matches(".onnx")
        .replace('/', "_")
}

#[test]
fn inspect_snapshots() {
    for m in MODELS {
        let (code, out, err) = mpopt(&["inspect", m]);
        assert_eq!(code, 0, "{err}");
        insta::assert_snapshot!(format!("inspect_{}", snap_name(m)), out);
    }
}

#[test]
fn print_snapshots() {
    for m in MODELS {
        let (code, out, err) = mpopt(&["print", m]);
        assert_eq!(code, 0, "{err}");
        insta::assert_snapshot!(format!("print_{}", snap_name(m)), out);
    }
}

#[test]
fn copy_keeps_the_model() {
    let dir = tempfile::tempdir().unwrap();
    for m in MODELS {
        let out = dir.path().join(format!("{}.onnx", snap_name(m)));
        let (code, _, err) = mpopt(&["copy", m, "-o", out.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        let (_, before, _) = mpopt(&["print", m]);
        let (_, after, _) = mpopt(&["print", out.to_str().unwrap()]);
        assert_eq!(before, after, "{m}");
    }
}

#[test]
fn copy_moves_data_out_and_back_in() {
    let dir = tempfile::tempdir().unwrap();
    let ext = dir.path().join("ext.onnx");
    let (code, _, err) = mpopt(&[
        "copy",
        "testdata/models/tiny_mlp.onnx",
        "-o",
        ext.to_str().unwrap(),
        "--external-data",
    ]);
    assert_eq!(code, 0, "{err}");
    let data = dir.path().join("ext.onnx.data");
    assert!(data.is_file(), "no data file written");
    // w1 (16x32 f32, 2048 bytes) goes out; w2 (512 bytes) and b1 (128 bytes) are under the 1 KiB threshold.
    let (_, inspect, _) = mpopt(&["inspect", ext.to_str().unwrap()]);
    assert!(
        inspect.contains("external data:\n  ext.onnx.data: 1 tensor, 2048 bytes\n"),
        "{inspect}"
    );
    let m = mpopt_onnx::load(&ext).unwrap();
    for &v in m.graph.initializers() {
        if let Some(o) = &m.graph.value(v).initializer.as_ref().unwrap().external {
            assert_eq!(
                o.offset % 64,
                0,
                "offset {} of '{}' is not aligned",
                o.offset,
                m.graph.value(v).name()
            );
        }
    }
    let back = dir.path().join("back.onnx");
    let (code, _, err) = mpopt(&["copy", ext.to_str().unwrap(), "-o", back.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(!dir.path().join("back.onnx.data").exists());
    let (_, a, _) = mpopt(&["print", "testdata/models/tiny_mlp.onnx"]);
    let (_, b, _) = mpopt(&["print", back.to_str().unwrap()]);
    assert_eq!(a, b);
    // Internalized again, the copy is byte-identical to the original file.
    assert_eq!(
        std::fs::read(&back).unwrap(),
        std::fs::read(root().join("testdata/models/tiny_mlp.onnx")).unwrap()
    );
}

/// Runs `mpopt copy BAD -o <tmp>/out.onnx` and checks the one-line error, exit code 1, and an empty folder.
fn assert_rejected(input: &str, expected: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let (code, stdout, stderr) = mpopt(&["copy", input, "-o", out.to_str().unwrap()]);
    assert_eq!(code, 1, "{input}: {stderr}");
    assert_eq!(stdout, "");
    assert_eq!(stderr, format!("error: {expected}\n"), "{input}");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{input}: files left behind: {left:?}");
}

#[test]
fn bad_models_are_rejected_with_a_clear_error() {
    let cases = [
        (
            "testdata/bad/cycle.onnx",
            "testdata/bad/cycle.onnx: graph 'tiny_mlp': cycle through nodes 'fc1' (MatMul) -> 'fc1_bias' (Add) -> 'act' (Relu)",
        ),
        (
            "testdata/bad/dangling.onnx",
            "testdata/bad/dangling.onnx: graph 'tiny_mlp': node 'fc2' (MatMul) reads 'missing_value', which is never defined",
        ),
        (
            "testdata/bad/defined_twice.onnx",
            "testdata/bad/defined_twice.onnx: graph 'tiny_mlp': value 'h' is defined twice (again by node 'act')",
        ),
        (
            "testdata/bad/unknown_dtype.onnx",
            "testdata/bad/unknown_dtype.onnx: graph 'tiny_mlp': initializer 'b1': tensor has unknown data type 99",
        ),
        (
            "testdata/bad/external_escape/model.onnx",
            "testdata/bad/external_escape/model.onnx: graph 'tiny_mlp': initializer 'w1': external data location \
             '../../models/tiny_mlp.onnx' must be a relative path inside the model's folder",
        ),
        (
            "testdata/bad/external_missing/model.onnx",
            "testdata/bad/external_missing/model.onnx: graph 'tiny_mlp': initializer 'w1': external data file \
             'testdata/bad/external_missing/weights.bin': No such file or directory (os error 2)",
        ),
        (
            "testdata/bad/external_short/model.onnx",
            "testdata/bad/external_short/model.onnx: graph 'tiny_mlp': initializer 'w1': external data file \
             'testdata/bad/external_short/weights.bin' is too short: needs bytes 0..2048, has 100",
        ),
        (
            "testdata/no_such_model.onnx",
            "testdata/no_such_model.onnx: No such file or directory (os error 2)",
        ),
    ];
    for (input, expected) in cases {
        assert_rejected(input, expected);
    }
}

#[test]
fn truncated_empty_and_garbage_files_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let full = std::fs::read(root().join("testdata/models/tiny_mlp.onnx")).unwrap();
    let cut = dir.path().join("truncated.onnx");
    std::fs::write(&cut, &full[..full.len() / 2]).unwrap();
    let empty = dir.path().join("empty.onnx");
    std::fs::write(&empty, b"").unwrap();
    let junk = dir.path().join("junk.onnx");
    std::fs::write(&junk, b"\xff\xff\xff\xff this is not protobuf").unwrap();
    for (p, msg) in [
        (&cut, "not a valid ONNX protobuf (truncated or corrupt): "),
        (&empty, "the file is empty"),
        (&junk, "not a valid ONNX protobuf (truncated or corrupt): "),
    ] {
        let out = dir.path().join("out.onnx");
        let (code, _, stderr) = mpopt(&["copy", p.to_str().unwrap(), "-o", out.to_str().unwrap()]);
        assert_eq!(code, 1, "{stderr}");
        let prefix = format!("error: {}: {msg}", p.display());
        assert!(
            stderr.starts_with(&prefix) && stderr.lines().count() == 1,
            "{stderr}"
        );
        assert!(!out.exists());
    }
}

/// A copy of the tiny test model in `dir` (`m.onnx`), and its bytes, to check it is left alone.
fn tiny_model_in(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
    let m = dir.join("m.onnx");
    std::fs::copy(root().join("testdata/models/tiny_mlp.onnx"), &m).unwrap();
    let bytes = std::fs::read(&m).unwrap();
    (m, bytes)
}

#[test]
fn output_equal_to_input_is_a_usage_error_and_leaves_the_input_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (m, before) = tiny_model_in(dir.path());
    let same = dir.path().join(".").join("m.onnx");
    let (code, _, stderr) = mpopt(&["copy", m.to_str().unwrap(), "-o", same.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert_eq!(
        stderr,
        format!(
            "error: the output '{}' is the input model; choose another output path\n",
            same.display()
        )
    );
    assert_eq!(std::fs::read(&m).unwrap(), before);
}

#[test]
fn no_written_file_may_be_one_the_command_reads_or_writes_twice() {
    let dir = tempfile::tempdir().unwrap();
    let (m, before) = tiny_model_in(dir.path());
    let inputs = dir.path().join("in.npz");
    let x = mpopt_exec::Tensor::f32(vec![2, 16], vec![0.5; 32]);
    mpopt_exec::io::write_npz(&inputs, &[("x".to_string(), &x)]).unwrap();
    let inputs_before = std::fs::read(&inputs).unwrap();
    let out = dir.path().join("out.onnx");
    let (m_, i_, o_) = (
        m.to_str().unwrap(),
        inputs.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    for (args, want) in [
        (
            vec![m_, "-o", o_, "--report", m_],
            format!("the report '{m_}' is the input model; choose another report path"),
        ),
        (
            vec![m_, "-o", o_, "--report", o_],
            format!("the report '{o_}' is also the output; give them different paths"),
        ),
        (
            vec![m_, "-o", i_, "--calib", i_],
            format!("the output '{i_}' is a calibration file, which this command reads"),
        ),
        (
            vec!["run", m_, "--inputs", i_, "-o", i_],
            format!("the output '{i_}' is the inputs file, which this command reads"),
        ),
        (
            vec!["compare", m_, m_, "--inputs", i_, "--json", m_],
            format!(
                "the JSON metrics file '{m_}' is the reference model, which this command reads"
            ),
        ),
    ] {
        let (code, _, stderr) = mpopt(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(&want), "{args:?}: {stderr}");
        assert!(!out.exists(), "{args:?}: nothing is written");
    }
    assert_eq!(std::fs::read(&m).unwrap(), before);
    assert_eq!(std::fs::read(&inputs).unwrap(), inputs_before);
    // a report whose folder does not exist is found before the conversion runs, not after
    let (code, _, stderr) = mpopt(&[m_, "-o", o_, "--report", "/nonexistent-dir/r.json"]);
    assert_eq!(code, 1);
    assert_eq!(
        stderr,
        "error: cannot write the report '/nonexistent-dir/r.json': the folder '/nonexistent-dir' does not exist\n"
    );
    assert!(!out.exists());
}

#[test]
fn an_existing_output_is_replaced_whole_and_no_temporary_file_is_left() {
    let dir = tempfile::tempdir().unwrap();
    let src = root().join("testdata/models/tiny_mlp.onnx");
    let fresh = dir.path().join("fresh.onnx");
    let (code, _, stderr) = mpopt(&["copy", src.to_str().unwrap(), "-o", fresh.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    // an older, longer file at the output path, read-only as a file (the folder is writable)
    let out = dir.path().join("out.onnx");
    std::fs::write(&out, vec![7u8; 1 << 20]).unwrap();
    let mut perms = std::fs::metadata(&out).unwrap().permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(&out, perms).unwrap();
    let (code, _, stderr) = mpopt(&["copy", src.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&fresh).unwrap());
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["fresh.onnx", "out.onnx"]);
}

#[test]
fn never_overwrites_the_external_data_it_reads() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["model.onnx", "weights.bin"] {
        std::fs::copy(
            root().join("testdata/models/external").join(f),
            dir.path().join(f),
        )
        .unwrap();
    }
    let before = std::fs::read(dir.path().join("weights.bin")).unwrap();
    let target = dir.path().join("weights.bin");
    let (code, _, stderr) = mpopt(&[
        "copy",
        dir.path().join("model.onnx").to_str().unwrap(),
        "-o",
        target.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("which the model reads its data from"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&target).unwrap(), before);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn unwritable_output_names_the_path() {
    let (code, _, stderr) = mpopt(&[
        "copy",
        "testdata/models/tiny_mlp.onnx",
        "-o",
        "/nonexistent-dir/out.onnx",
    ]);
    assert_eq!(code, 1);
    assert_eq!(
        stderr,
        "error: cannot write the output '/nonexistent-dir/out.onnx': the folder '/nonexistent-dir' does not exist\n"
    );
}

#[test]
fn usage_errors_exit_2() {
    let (code, _, stderr) = mpopt(&["copy", "testdata/models/tiny_mlp.onnx"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--output <OUTPUT>"), "{stderr}");
    let (code, _, _) = mpopt(&["frobnicate"]);
    assert_eq!(code, 2);
}
