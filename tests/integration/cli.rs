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

/// Whether `s` is a value as Keras' progress bar writes it: `0.1234`, or `1.2345e-04` at 1e-3
/// and below.
fn keras_value(s: &str) -> bool {
    let (mantissa, exp) = match s.split_once('e') {
        Some((m, e)) => (m, Some(e)),
        None => (s, None),
    };
    let Some((int, frac)) = mantissa.trim_start_matches('-').split_once('.') else {
        return false;
    };
    let digits = |t: &str| !t.is_empty() && t.chars().all(|c| c.is_ascii_digit());
    let exp_ok = match exp {
        None => s.parse::<f64>().is_ok_and(|v| v.abs() > 1e-3),
        Some(e) => {
            (e.starts_with('-') || e.starts_with('+'))
                && e.len() >= 3
                && digits(&e[1..])
                && int.len() == 1
                && s.parse::<f64>().is_ok_and(|v| v.abs() <= 1e-3)
        }
    };
    // Scientific mantissas are normalized: 1 to 9 before the point, or a zero value.
    let normalized = exp.is_none() || int != "0" || frac == "0000";
    digits(int) && frac.len() == 4 && digits(frac) && exp_ok && normalized
}

/// The texts of an SVG drawing, trimmed.
fn svg_texts(path: &std::path::Path) -> Vec<String> {
    let svg = std::fs::read_to_string(path).unwrap();
    svg.split("<text")
        .skip(1)
        .filter_map(|t| t.split_once('>').map(|(_, rest)| rest))
        .filter_map(|rest| {
            rest.split_once("</text>")
                .map(|(t, _)| t.trim().to_string())
        })
        .collect()
}

#[test]
fn train_off_a_terminal_writes_one_plain_line_per_epoch() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-progress-{}", std::process::id()));
    let out = dir.join("run");
    let (ok, _, err) = kiln(&["train", "--epochs", "3", "--out", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    // stderr is a pipe here: no bar, no cursor movement, no colour, only the epoch lines.
    assert!(
        !err.contains('\x1b') && !err.contains('\r'),
        "control characters in {err:?}"
    );
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    for (i, line) in lines.iter().enumerate() {
        let fields: Vec<&str> = line.split(" - ").collect();
        assert_eq!(fields[0], format!("Epoch {}/3", i + 1), "{line}");
        // The epoch's duration (`420ms`, `1.2s`), then the time per step (`2ms/step`).
        let d = fields[1];
        assert!(
            d.strip_suffix("ms")
                .is_some_and(|n| n.parse::<u32>().is_ok())
                || d.strip_suffix('s')
                    .is_some_and(|n| n.parse::<f64>().is_ok()),
            "duration `{d}` in {line}"
        );
        let step = fields[2]
            .strip_suffix("/step")
            .unwrap_or_else(|| panic!("{line}"));
        assert!(
            ["us", "ms", "s"].iter().any(|u| step
                .strip_suffix(u)
                .is_some_and(|n| n.parse::<u32>().is_ok())),
            "time per step `{step}` in {line}"
        );
        let names: Vec<&str> = fields[3..]
            .iter()
            .map(|f| {
                let (name, value) = f
                    .split_once(": ")
                    .unwrap_or_else(|| panic!("{f} in {line}"));
                assert!(keras_value(value), "`{value}` of {name} in {line}");
                name
            })
            .collect();
        assert_eq!(
            names,
            [
                "loss",
                "digit_loss",
                "l2",
                "accuracy",
                "val_loss",
                "val_digit_loss",
                "val_l2",
                "val_accuracy"
            ],
            "{line}"
        );
    }
    // The history records each epoch's duration, and no line repeats it as a value.
    let history: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("history.json")).unwrap()).unwrap();
    let times: Vec<f64> = history["epoch_time_s"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(times.len(), 3);
    assert!(times.iter().all(|t| *t > 0.0 && *t < 60.0), "{times:?}");
    let csv = std::fs::read_to_string(out.join("history.csv")).unwrap();
    assert!(csv
        .lines()
        .next()
        .unwrap()
        .split(',')
        .any(|c| c == "epoch_time_s"));
    // The metrics have their own plot; the loss plot names the terms, not the accuracy.
    let loss = svg_texts(&out.join("loss.svg"));
    let metrics = svg_texts(&out.join("metrics.svg"));
    let has = |texts: &[String], t: &str| texts.iter().any(|x| x == t);
    assert!(has(&loss, "l2") && has(&loss, "val_loss"), "{loss:?}");
    assert!(!has(&loss, "accuracy"), "{loss:?}");
    assert!(
        has(&metrics, "accuracy") && has(&metrics, "val_accuracy"),
        "{metrics:?}"
    );
    for texts in [&loss, &metrics] {
        assert!(!texts
            .iter()
            .any(|t| t.contains("epoch_time_s") || t == "learning_rate"));
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn keras_value_accepts_only_keras_formats() {
    for ok in [
        "0.1234",
        "12.5000",
        "-0.5000",
        "1.2345e-04",
        "0.0000e+00",
        "-2.0000e-07",
    ] {
        assert!(keras_value(ok), "{ok}");
    }
    for bad in [
        "0.0001",
        "0.12",
        "1.2345e-4",
        "1e-3",
        "0.5000e-04",
        "1.0000e-03x",
    ] {
        assert!(!keras_value(bad), "{bad}");
    }
}

/// `kiln check-loss`: a report per loss, exit status 0 when all pass, non-zero when a check
/// fails (categorical generalized crossentropy's gradient at p = 0) or a name is unknown.
#[test]
fn check_loss_reports_and_sets_the_exit_status() {
    let (ok, out, err) = kiln(&["check-loss", "mse", "sparse_categorical_crossentropy"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("loss `mean_squared_error` on Real inputs"),
        "{out}"
    );
    assert!(
        out.contains("ok   gradient") && out.contains("ok   reduction"),
        "{out}"
    );
    assert_eq!(out.matches("\npassed").count(), 2, "{out}");
    let (ok, out, _) = kiln(&["check-loss", "categorical_generalized_cross_entropy"]);
    assert!(!ok);
    assert!(
        out.contains("FAIL finite") && out.contains("wrong class"),
        "{out}"
    );
    let (ok, _, err) = kiln(&["check-loss", "no_such_loss"]);
    assert!(!ok && err.contains("unknown loss `no_such_loss`"), "{err}");
}
