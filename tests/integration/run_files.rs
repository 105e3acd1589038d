//! Run files through the `kiln` command: train, resume, evaluate, predict, and broken input.

use std::path::{Path, PathBuf};

fn kiln(args: &[&str], dir: &Path) -> (bool, String, String) {
    crate::support::kiln_in(args, dir)
}

fn temp(name: &str) -> std::path::PathBuf {
    crate::support::temp("run", name)
}

/// A small CSV classification set: two features, label = x0 + x1 > 0.
fn write_csv(path: &Path) {
    let mut text = String::from("a,b,label\n");
    for i in 0..200 {
        let a = ((i * 37) % 101) as f64 / 50.0 - 1.0;
        let b = ((i * 53) % 97) as f64 / 48.0 - 1.0;
        text.push_str(&format!("{a},{b},{}\n", if a + b > 0.0 { 1 } else { 0 }));
    }
    std::fs::write(path, text).unwrap();
}

const RUN: &str = r#"
seed = 3
[data]
source = "csv"
path = "points.csv"
label_columns = ["label"]
test_split = 0.25

[model]
layers = [
  { type = "dense", name = "hidden", units = 8, activation = "tanh", kernel_regularizer = { l2 = 1e-3 } },
  { type = "dropout", rate = 0.1 },
  { type = "dense", name = "out", units = 1 },
]

[compile]
optimizer = { type = "adam", learning_rate = 0.02 }
loss = { type = "binary_crossentropy", from_logits = true }
metrics = ["accuracy"]

[[added]]
kind = "fgsm"
epsilon = 0.05
multiplier = 0.5

[fit]
epochs = 6
batch_size = 16
validation_split = 0.2
callbacks = [{ type = "lr_schedule", schedule = "cosine", initial = 0.02, decay_epochs = 6 }]
"#;

#[test]
fn train_writes_the_run_folder_and_resume_matches_an_unbroken_run() {
    let dir = temp("train");
    write_csv(&dir.join("points.csv"));
    std::fs::write(dir.join("run.toml"), RUN).unwrap();
    let (ok, out, err) = kiln(&["train", "run.toml", "--quiet", "--out", "full"], &dir);
    assert!(ok, "{err}");
    for needle in ["out_loss", "adversarial", "l2", "accuracy", "held-out:"] {
        assert!(out.contains(needle), "`{needle}` missing:\n{out}");
    }
    for file in [
        "history.json",
        "history.csv",
        "model.safetensors",
        "model.json",
        "loss.png",
        "loss.svg",
        "checkpoints/last.safetensors",
    ] {
        assert!(dir.join("full").join(file).exists(), "{file} missing");
    }
    let history: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("full/history.json")).unwrap())
            .unwrap();
    for key in [
        "loss",
        "out_loss",
        "adversarial",
        "l2",
        "accuracy",
        "val_loss",
        "val_out_loss",
        "val_adversarial",
        "learning_rate",
    ] {
        assert_eq!(
            history[key].as_array().map(Vec::len),
            Some(6),
            "{key}: {history}"
        );
    }
    let svg = std::fs::read_to_string(dir.join("full/loss.svg")).unwrap();
    assert!(
        svg.contains("adversarial") && svg.contains("val_loss"),
        "the SVG legend names the terms"
    );
    let png = std::fs::read(dir.join("full/loss.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");

    // Stop after 3 epochs, then resume to 6: the same weights as the unbroken run.
    let (ok, _, err) = kiln(
        &[
            "train", "run.toml", "--quiet", "--out", "part", "--epochs", "3",
        ],
        &dir,
    );
    assert!(ok, "{err}");
    let (ok, _, err) = kiln(&["train", "run.toml", "--quiet", "--resume", "part"], &dir);
    assert!(ok, "{err}");
    let full = std::fs::read(dir.join("full/model.safetensors")).unwrap();
    let resumed = std::fs::read(dir.join("part/model.safetensors")).unwrap();
    assert!(
        full == resumed,
        "a resumed run must end with the weights of an unbroken run"
    );
    let resumed_history: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("part/history.json")).unwrap())
            .unwrap();
    assert_eq!(resumed_history["loss"], history["loss"]);

    // Evaluate with the saved model.json alone, with and without an attack, as JSON.
    let (ok, out, err) = kiln(
        &[
            "evaluate",
            "full/model.json",
            "--weights",
            "full/model.safetensors",
            "--data",
            "points.csv",
            "--json",
        ],
        &dir,
    );
    assert!(ok, "{err}");
    let logs: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(logs["accuracy"].as_f64().unwrap() > 0.85, "{logs}");
    let (ok, out, err) = kiln(
        &[
            "evaluate",
            "run.toml",
            "--weights",
            "full/model.safetensors",
            "--attack",
            "fgsm:0.3",
            "--json",
        ],
        &dir,
    );
    assert!(ok, "{err}");
    let attacked: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(
        attacked["loss"].as_f64().unwrap() > logs["loss"].as_f64().unwrap() * 0.9,
        "{attacked}"
    );

    // Predict to CSV.
    std::fs::write(dir.join("x.csv"), "a,b\n0.5,0.5\n-0.5,-0.5\n").unwrap();
    let (ok, _, err) = kiln(
        &[
            "predict",
            "run.toml",
            "--weights",
            "full/model.safetensors",
            "--input",
            "x.csv",
            "--output",
            "p.csv",
        ],
        &dir,
    );
    assert!(ok, "{err}");
    let p = std::fs::read_to_string(dir.join("p.csv")).unwrap();
    let lines: Vec<&str> = p.lines().collect();
    assert_eq!(lines[0], "out_0");
    let (pos, neg): (f64, f64) = (lines[1].parse().unwrap(), lines[2].parse().unwrap());
    assert!(pos > 0.0 && neg < 0.0, "logits {pos} {neg}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn broken_run_files_and_data_are_errors_that_say_where() {
    let dir = temp("broken");
    write_csv(&dir.join("points.csv"));
    let cases: Vec<(String, &str)> = vec![
        (
            RUN.replace("units = 8,", "units = 8, unit = 3,"),
            "line 11: layers[0]: unknown key `unit`",
        ),
        (
            RUN.replace("epochs = 6", "epochs = \"six\""),
            "line 27: run file `fit` `epochs`: expected a non-negative integer",
        ),
        (
            RUN.replace("rate = 0.1", "rate = 1.5"),
            "line 12: layers[1]",
        ),
        (
            RUN.replace("[fit]", "[fitt]"),
            "line 26: run file `fitt`: unknown section",
        ),
        (
            RUN.replace("type = \"adam\"", "type = \"adamm\""),
            "unknown optimizer `adamm`",
        ),
        (
            RUN.replace(
                "\"binary_crossentropy\", from_logits",
                "\"binary_crossentropy\", from_logit",
            ),
            "BinaryCrossentropy has no parameter `from_logit`",
        ),
        (
            RUN.replace("label_columns = [\"label\"]", "label_columns = [\"y\"]"),
            "no column named `y`",
        ),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let name = format!("bad{i}.toml");
        std::fs::write(dir.join(&name), text).unwrap();
        let (ok, _, err) = kiln(&["train", &name, "--quiet", "--out", "o"], &dir);
        assert!(!ok, "case {i} should fail");
        assert!(
            err.contains(expected) && err.contains(&name) || err.contains(expected),
            "case {i}: expected `{expected}` in: {err}"
        );
    }
    std::fs::write(dir.join("ragged.csv"), "a,b,label\n1,2,0\n3,4\n").unwrap();
    std::fs::write(
        dir.join("ragged.toml"),
        RUN.replace("points.csv", "ragged.csv"),
    )
    .unwrap();
    let (ok, _, err) = kiln(&["train", "ragged.toml", "--quiet"], &dir);
    assert!(
        !ok && err.contains("ragged.csv") && err.contains("row 3"),
        "{err}"
    );
    std::fs::write(dir.join("text.csv"), "a,b,label\n1,x,0\n").unwrap();
    std::fs::write(dir.join("text.toml"), RUN.replace("points.csv", "text.csv")).unwrap();
    let (ok, _, err) = kiln(&["train", "text.toml", "--quiet"], &dir);
    assert!(
        !ok && err.contains("row 2, column `b`: `x` is not a number"),
        "{err}"
    );
    // A truncated IDX file.
    let mut idx = vec![0u8, 0, 8, 3, 0, 0, 0, 10, 0, 0, 0, 28, 0, 0, 0, 28];
    idx.extend(vec![0u8; 100]);
    std::fs::write(dir.join("images.idx"), &idx).unwrap();
    std::fs::write(
        dir.join("labels.idx"),
        [0u8, 0, 8, 1, 0, 0, 0, 10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0],
    )
    .unwrap();
    let idx_run = RUN.replace(
        "source = \"csv\"\npath = \"points.csv\"\nlabel_columns = [\"label\"]",
        "source = \"idx\"\nimages = \"images.idx\"\nlabels = \"labels.idx\"",
    );
    std::fs::write(dir.join("idx.toml"), idx_run).unwrap();
    let (ok, _, err) = kiln(&["train", "idx.toml", "--quiet"], &dir);
    assert!(
        !ok && err.contains("images.idx") && err.contains("truncated"),
        "{err}"
    );
    let (ok, _, err) = kiln(&["train", "--resume", "nowhere", "--quiet"], &dir);
    assert!(!ok && err.contains("cannot resume from nowhere"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn losses_lists_every_loss_with_its_defaults() {
    let (ok, out, _) = kiln(&["losses"], Path::new("."));
    assert!(ok);
    for needle in [
        "categorical_focal_crossentropy",
        "alpha = 0.25, gamma = 2.0",
        "ctc",
        "circle",
        "huber",
        "delta = 1.0",
    ] {
        assert!(out.contains(needle), "`{needle}` missing");
    }
    assert_eq!(out.lines().filter(|l| !l.is_empty()).count(), 22 + 3);
}

#[test]
fn a_custom_loss_is_used_by_name_once_registered() {
    let text = RUN
        .replace(
            "loss = { type = \"binary_crossentropy\", from_logits = true }",
            "loss = \"kiln_test_abs_loss\"",
        )
        .replace(
            "path = \"points.csv\"\nlabel_columns = [\"label\"]",
            "path = \"unused.csv\"\nlabel_columns = [\"label\"]",
        );
    let text = text.replace("[data]\nsource = \"csv\"\npath = \"unused.csv\"\nlabel_columns = [\"label\"]\ntest_split = 0.25\n", "");
    let text = text.replace(
        "[model]\n",
        "[model]\ninputs = [{ name = \"x\", shape = [2] }]\n",
    );
    let run = kiln::run::RunFile::from_text("custom.toml", &text, PathBuf::new()).unwrap();
    let err = run
        .prepare(None, &candle_core::Device::Cpu)
        .err()
        .expect("unregistered loss must fail")
        .to_string();
    assert!(
        err.contains("custom.toml line")
            && err.contains("unknown loss `kiln_test_abs_loss`")
            && err.contains("register"),
        "{err}"
    );
    kiln::losses::register(
        "kiln_test_abs_loss",
        kiln::losses::loss_fn(
            "kiln_test_abs_loss",
            |t: &candle_core::Tensor, p: &candle_core::Tensor| {
                Ok((p - t)?.abs()?.mean(candle_core::D::Minus1)?)
            },
        ),
    );
    let prepared = run.prepare(None, &candle_core::Device::Cpu).unwrap();
    assert_eq!(prepared.model.output_names(), &["out".to_string()]);
}

#[test]
fn resume_restores_the_callbacks_counters() {
    // A plateau that never sees an improvement after the first epoch halves the rate every
    // second epoch: 0.02 until epoch 2, 0.01 until epoch 4, then 0.005. Resuming at epoch 3
    // with fresh counters would halve at epoch 5 instead of 4; the checkpoint keeps them.
    let dir = temp("resume-callbacks");
    write_csv(&dir.join("points.csv"));
    let run = RUN.replace(
        "callbacks = [{ type = \"lr_schedule\", schedule = \"cosine\", initial = 0.02, decay_epochs = 6 }]",
        "callbacks = [\n  { type = \"reduce_lr_on_plateau\", monitor = \"val_loss\", factor = 0.5, patience = 2, min_delta = 10.0 },\n  { type = \"early_stopping\", monitor = \"val_loss\", patience = 100 },\n]",
    );
    assert_ne!(run, RUN);
    std::fs::write(dir.join("run.toml"), run).unwrap();
    let (ok, _, err) = kiln(&["train", "run.toml", "--quiet", "--out", "full"], &dir);
    assert!(ok, "{err}");
    let (ok, _, err) = kiln(
        &[
            "train", "run.toml", "--quiet", "--out", "part", "--epochs", "3",
        ],
        &dir,
    );
    assert!(ok, "{err}");
    let (ok, _, err) = kiln(&["train", "run.toml", "--quiet", "--resume", "part"], &dir);
    assert!(ok, "{err}");
    let read = |p: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(p)).unwrap()).unwrap()
    };
    let lrs: Vec<f64> = read("full/history.json")["learning_rate"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(lrs, vec![0.02, 0.02, 0.01, 0.01, 0.005, 0.005]);
    assert_eq!(
        read("part/history.json")["learning_rate"],
        read("full/history.json")["learning_rate"]
    );
    assert!(
        std::fs::read(dir.join("full/model.safetensors")).unwrap()
            == std::fs::read(dir.join("part/model.safetensors")).unwrap()
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn model_json_errors_name_the_line_of_the_users_file() {
    let dir = temp("model-json-lines");
    write_csv(&dir.join("points.csv"));
    std::fs::write(dir.join("run.toml"), RUN).unwrap();
    let (ok, _, err) = kiln(
        &[
            "train", "run.toml", "--quiet", "--out", "r", "--epochs", "1",
        ],
        &dir,
    );
    assert!(ok, "{err}");
    let good = std::fs::read_to_string(dir.join("r/model.json")).unwrap();
    // Each mutation: what to replace, what with, and a word the error must contain.
    let cases = [
        (
            "\"units\": 8",
            "\"units\": 8, \"unit\": 3",
            "unknown key `unit`",
        ),
        ("\"units\": 8", "\"units\": \"8\"", "units"),
        ("\"tanh\"", "\"tanhh\"", "tanhh"),
        ("\"adam\"", "\"adamm\"", "adamm"),
        (
            "\"binary_crossentropy\"",
            "\"binary_crossentropyy\"",
            "binary_crossentropyy",
        ),
        ("\"accuracy\"", "\"acuracy\"", "acuracy"),
        ("\"rate\": 0.1", "\"rate\": null", "null"),
    ];
    for (from, to, needle) in cases {
        assert!(good.contains(from), "model.json has no `{from}`:\n{good}");
        let bad = good.replacen(from, to, 1);
        // The line of the value, or of the table that holds it (for errors about the table).
        let at = bad.find(to).unwrap();
        let line = bad[..at].matches('\n').count() + 1;
        let table = bad[..bad[..at].rfind('{').unwrap()].matches('\n').count() + 1;
        std::fs::write(dir.join("r/model.json"), &bad).unwrap();
        let (ok, _, err) = kiln(&["evaluate", "r", "--data", "points.csv"], &dir);
        assert!(
            !ok && (err.contains(&format!("model.json line {line}:"))
                || err.contains(&format!("model.json line {table}:")))
                && err.contains(needle),
            "{to}: expected line {line} (or {table}): {err}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn non_finite_data_is_an_error_unless_the_run_file_allows_it() {
    let dir = temp("non-finite");
    write_csv(&dir.join("points.csv"));
    let text = std::fs::read_to_string(dir.join("points.csv")).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines[7] = "nan,0.5,1".to_string();
    std::fs::write(dir.join("points.csv"), lines.join("\n") + "\n").unwrap();
    std::fs::write(dir.join("run.toml"), RUN).unwrap();
    let (ok, _, err) = kiln(&["train", "run.toml", "--quiet", "--epochs", "1"], &dir);
    assert!(
        !ok && err.contains("points.csv") && err.contains("row 8") && err.contains("`a`"),
        "{err}"
    );
    let allowed = RUN.replace(
        "test_split = 0.25",
        "test_split = 0.25\nallow_non_finite = true",
    );
    std::fs::write(dir.join("allowed.toml"), allowed).unwrap();
    let (ok, _, err) = kiln(&["train", "allowed.toml", "--quiet", "--epochs", "1"], &dir);
    assert!(ok, "opted in: {err}");
    let (ok, _, err) = kiln(
        &[
            "train", "run.toml", "--quiet", "--epochs", "1", "--out", "x",
        ],
        &dir,
    );
    assert!(!ok, "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `trainable = false` on a layer of a run file freezes it, as Keras' `layer.trainable = False`;
/// a value that is not a boolean is an error naming the line.
#[test]
fn a_layer_marked_not_trainable_in_a_run_file_is_frozen() {
    let text = |v: &str| {
        format!(
            "[model]\ninputs = [{{ name = \"x\", shape = [3] }}]\nlayers = [\n  {{ type = \"dense\", name = \"base\", units = 4, trainable = {v} }},\n  {{ type = \"dense\", name = \"head\", units = 1 }},\n]\n[compile]\noptimizer = \"sgd\"\nloss = \"mse\"\n"
        )
    };
    let run = kiln::run::RunFile::from_text("frozen.toml", &text("false"), PathBuf::new()).unwrap();
    let model = run.prepare(None, &candle_core::Device::Cpu).unwrap().model;
    assert!(!model.is_trainable("base").unwrap());
    assert!(model.is_trainable("head").unwrap());
    let trainable: Vec<String> = model
        .trainable_weights()
        .into_iter()
        .map(|w| w.name)
        .collect();
    assert_eq!(trainable, ["head/kernel", "head/bias"]);
    let err = kiln::run::RunFile::from_text("frozen.toml", &text("\"no\""), PathBuf::new())
        .and_then(|r| r.prepare(None, &candle_core::Device::Cpu).map(|_| ()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("frozen.toml") && err.contains("line 4") && err.contains("trainable"),
        "{err}"
    );
}
