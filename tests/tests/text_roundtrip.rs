//! `print(parse(print(m))) == print(m)` on real models, and the IR survives an ONNX encode/decode unchanged.

mod common;

use mpopt_ir::text::{parse_model, print_model};

#[test]
fn printed_text_parses_back_to_the_same_text_on_real_models() {
    let models = common::suite_models();
    let mut failures = Vec::new();
    for path in &models {
        let m = mpopt_onnx::load(path).unwrap_or_else(|e| panic!("{e}"));
        let text = print_model(&m);
        match parse_model(&text) {
            Ok(back) => {
                if let Err(e) = mpopt_ir::verify_model(&back) {
                    failures.push(format!(
                        "{}: parsed model fails verification: {e}",
                        path.display()
                    ));
                }
                let again = print_model(&back);
                if again != text {
                    let line = text
                        .lines()
                        .zip(again.lines())
                        .position(|(a, b)| a != b)
                        .unwrap_or(0);
                    failures.push(format!(
                        "{}: reprint differs at line {}:\n  {}\n  {}",
                        path.display(),
                        line + 1,
                        text.lines().nth(line).unwrap_or(""),
                        again.lines().nth(line).unwrap_or("")
                    ));
                }
            }
            Err(e) => failures.push(format!(
                "{}: {e}\n  {}",
                path.display(),
                text.lines().nth(e.line - 1).unwrap_or("")
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} models:\n{}",
        failures.len(),
        models.len(),
        failures.join("\n")
    );
    eprintln!("text round trip: {} models", models.len());
}

#[test]
fn encode_decode_keeps_the_printed_ir() {
    for path in common::suite_models() {
        let m = mpopt_onnx::load(&path).unwrap();
        let bytes = mpopt_onnx::encode(&m).unwrap();
        let back = mpopt_onnx::decode(bytes.into()).unwrap();
        assert_eq!(print_model(&back), print_model(&m), "{}", path.display());
    }
}
