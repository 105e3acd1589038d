//! The `kiln` command as a user runs it.

use std::process::Command;

fn kiln(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn train_without_arguments_reports_every_term_and_held_out_accuracy() {
    let (ok, out, err) = kiln(&["train", "--quiet"]);
    assert!(ok, "{err}");
    for needle in [
        "held-out:",
        "loss",
        "digit_loss",
        "l2",
        "accuracy",
        "val_loss",
        "val_digit_loss",
        "val_l2",
    ] {
        assert!(out.contains(needle), "`{needle}` missing:\n{out}");
    }
    let held_out = out.split("held-out:").nth(1).unwrap();
    let accuracy: f64 = held_out
        .lines()
        .find(|l| l.trim_start().starts_with("accuracy"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    assert!(accuracy >= 0.96, "held-out accuracy {accuracy}");
}

#[test]
fn conformance_passes_on_the_fixtures_and_fails_on_a_wrong_file() {
    let (ok, out, _) = kiln(&[
        "conformance",
        "keras",
        "tests/fixtures/keras_cases_seed7.json",
        "tests/fixtures/keras_cases_seed11.json",
    ]);
    assert!(ok);
    assert_eq!(out.lines().last(), Some("884 passed, 0 failed"));

    let dir = std::env::temp_dir().join(format!("kiln-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.json");
    std::fs::write(
        &bad,
        r#"[{"kind": "regularizer", "regularizer": "L2", "config": {"l2": 0.5}, "weights": [1.0, -2.0], "value": 2.4}]"#,
    )
    .unwrap();
    let (ok, out, _) = kiln(&["conformance", "keras", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        out.contains("regularizer L2") && out.contains("expected [2.4000000], got [2.5000000]"),
        "{out}"
    );
    assert_eq!(out.lines().last(), Some("0 passed, 1 failed"));
    std::fs::write(&bad, "not json").unwrap();
    let (ok, _, err) = kiln(&["conformance", "keras", bad.to_str().unwrap()]);
    assert!(!ok && err.contains("bad.json"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `kiln summary` prints the default run's model as Keras' `model.summary()` does (the counts
/// Keras prints for Dense(64) on 64 inputs, then Dense(10)), for a run file and a run folder.
#[test]
fn summary_prints_the_model_as_keras_does() {
    let run = "crates/kiln/src/run/default.toml";
    let (ok, out, err) = kiln(&["summary", run]);
    assert!(ok, "{err}");
    let row = |layer: &str| -> Vec<String> {
        let line = out.lines().find(|l| l.contains(layer)).unwrap_or_default();
        line.split('│').map(|c| c.trim().to_string()).collect()
    };
    assert_eq!(
        row("input (InputLayer)")[1..4],
        ["input (InputLayer)", "(None, 64)", "0"]
    );
    assert_eq!(
        row("hidden (Dense)")[1..4],
        ["hidden (Dense)", "(None, 64)", "4,160"]
    );
    assert_eq!(
        row("digit (Dense)")[1..4],
        ["digit (Dense)", "(None, 10)", "650"]
    );
    for needle in [
        " Total params: 4,810 (18.79 KB)",
        " Trainable params: 4,810 (18.79 KB)",
        " Non-trainable params: 0 (0.00 B)",
    ] {
        assert!(out.contains(needle), "`{needle}` missing:\n{out}");
    }
    let (ok, _, err) = kiln(&["summary", "no-such-run.toml"]);
    assert!(!ok && err.contains("no-such-run.toml"), "{err}");
}
