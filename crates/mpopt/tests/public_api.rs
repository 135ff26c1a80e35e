//! Written only against the public API of `mpopt`: load a corpus model, apply a user pass and the default
//! pipeline, verify, save, and check the result with onnx.checker and onnxruntime (from the repository's
//! `.venv`, which CI creates; without it that last step is reported as skipped).

use std::path::{Path, PathBuf};

use mpopt::ir::pattern::Pattern;
use mpopt::passes::pipeline::Registry;
use mpopt::{ConvertOptions, Model, Pass, PassError, PassManager, PassOutcome};

/// A user pass: Identity nodes are removed and their readers read the input instead.
struct DropIdentity;

impl Pass for DropIdentity {
    fn name(&self) -> &'static str {
        "drop-identity"
    }
    fn run(&mut self, model: &mut Model) -> Result<PassOutcome, PassError> {
        let g = &mut model.graph;
        let mut removed = 0;
        for m in Pattern::op("Identity")
            .input(0, Pattern::any().capture("x"))
            .find(g)
        {
            let out = g.node(m.root).outputs()[0].unwrap();
            if g.outputs().contains(&out) {
                continue;
            }
            g.replace_all_uses(out, m.value("x").unwrap());
            g.remove_node(m.root);
            removed += 1;
        }
        Ok(PassOutcome {
            changed: removed > 0,
            counters: vec![("removed", removed)],
            ..PassOutcome::default()
        })
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

#[test]
fn load_rewrite_convert_verify_save_check() {
    let corpus = root().join("../shared/corpus/ppocr_mobile_v2_cls");
    let (model_path, inputs) = if corpus.is_dir() {
        (corpus.join("model.onnx"), Some(corpus.join("inputs.npz")))
    } else {
        (root().join("testdata/models/tiny_mlp.onnx"), None)
    };
    let mut model = mpopt::onnx::load(&model_path).unwrap();
    let mut registry = Registry::builtin();
    registry.register("drop-identity", || Box::new(DropIdentity));
    PassManager::new(registry.pipeline(&["drop-identity"]).unwrap())
        .verify_each(true)
        .run(&mut model)
        .unwrap();
    let summary = mpopt::convert(&mut model, &ConvertOptions::default()).unwrap();
    assert!(summary.low > 0, "something is lowered");
    mpopt::verify_model(&model).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    mpopt::onnx::save(&model, &out, mpopt::onnx::ExternalData::Auto).unwrap();

    let python = root().join(".venv/bin/python");
    if !python.exists() {
        eprintln!("SKIP: no .venv (CI creates it): onnx.checker and onnxruntime not run");
        return;
    }
    let script = r#"
import sys, numpy as np, onnx, onnxruntime as ort
onnx.checker.check_model(sys.argv[1], full_check=True)
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
if len(sys.argv) > 2:
    z = np.load(sys.argv[2])
    feeds = {k: z[k] for k in z.files if "__set" not in k}
else:
    feeds = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32) for i in sess.get_inputs()}
outs = sess.run(None, feeds)
assert all(np.isfinite(o).all() for o in outs if o.dtype.kind == "f")
print("ok", [o.shape for o in outs])
"#;
    let mut cmd = std::process::Command::new(python);
    cmd.arg("-c").arg(script).arg(&out);
    if let Some(i) = &inputs {
        cmd.arg(i);
    }
    let r = cmd.output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stdout).starts_with("ok"));
}
