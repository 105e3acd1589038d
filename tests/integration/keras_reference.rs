//! Every reference case written by real Keras 3.15.1 (seeds 7 and 11) must pass.

use std::path::Path;

fn check(file: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(file);
    let report = kiln::conformance::run_file(&path).expect("fixture readable");
    assert!(
        report.passed > 400,
        "{file}: only {} cases ran",
        report.passed
    );
    assert!(
        report.failures.is_empty(),
        "{file}: {} failed:\n{}",
        report.failed(),
        report.failures.join("\n")
    );
}

#[test]
fn keras_cases_seed7() {
    check("keras_cases_seed7.json");
}

#[test]
fn keras_cases_seed11() {
    check("keras_cases_seed11.json");
}

#[test]
fn a_wrong_number_is_reported() {
    // The checker itself can fail: a case whose expected value is off by 1% is a failure.
    let case = serde_json::json!([{
        "kind": "loss", "loss": "MeanSquaredError", "config": {},
        "y_true": [[0.0, 1.0]], "y_pred": [[1.0, 1.0]], "sample_weight": null, "mask": null,
        "per_sample": [0.5], "reduction": "sum", "reduced": 0.505
    }]);
    let report = kiln::conformance::run_json(&case.to_string()).unwrap();
    assert_eq!((report.passed, report.failed()), (0, 1));
    assert!(
        report.failures[0].contains("reduced"),
        "{}",
        report.failures[0]
    );
}
