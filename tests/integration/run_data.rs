//! The `[data]` section's preprocessing and split files as a user meets them: `standardize =
//! true` adapted on the training rows alone and applied again by `predict`, `test_path` and
//! `validation_path`, and `predict` on a file that still carries its label column.

use kiln::run::{RunFile, TrainOptions};
use std::path::Path;

fn kiln(args: &[&str], dir: &Path) -> (bool, String, String) {
    crate::support::kiln_in(args, dir)
}

fn temp(name: &str) -> std::path::PathBuf {
    crate::support::temp("data", name)
}

/// Rows of three features on very different scales (offset by `shift`) and a 0/1 label.
fn rows(n: usize, shift: f64, seed: usize) -> Vec<[f64; 4]> {
    (0..n)
        .map(|i| {
            let k = i * 7 + seed * 13;
            let a = ((k * 37) % 101) as f64 / 10.0 + shift;
            let b = ((k * 53) % 97) as f64 * 100.0 - 2000.0 + shift;
            let c = ((k * 29) % 89) as f64 / 1000.0 + shift;
            [
                a,
                b,
                c,
                if a + b / 1000.0 > shift * 1.001 + 5.0 {
                    1.0
                } else {
                    0.0
                },
            ]
        })
        .collect()
}

fn write_csv(path: &Path, header: &[&str], rows: &[[f64; 4]], order: [usize; 4]) {
    let mut text = order.map(|i| header[i]).join(",") + "\n";
    for r in rows {
        text += &order.map(|i| r[i].to_string()).join(",");
        text += "\n";
    }
    std::fs::write(path, text).unwrap();
}

const HEADER: [&str; 4] = ["a", "b", "c", "label"];
const IN_ORDER: [usize; 4] = [0, 1, 2, 3];

/// Per-feature mean and population variance, in f64.
fn moments(rows: &[[f64; 4]]) -> (Vec<f64>, Vec<f64>) {
    let n = rows.len() as f64;
    let mean: Vec<f64> = (0..3)
        .map(|j| rows.iter().map(|r| r[j]).sum::<f64>() / n)
        .collect();
    let var = (0..3)
        .map(|j| rows.iter().map(|r| (r[j] - mean[j]).powi(2)).sum::<f64>() / n)
        .collect();
    (mean, var)
}

fn weight(model: &kiln::Model, name: &str) -> Vec<f64> {
    model
        .weight(name)
        .unwrap()
        .var
        .as_tensor()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn assert_close(what: &str, got: &[f64], expected: &[f64], rel: f64) {
    assert_eq!(got.len(), expected.len(), "{what}");
    for (g, e) in got.iter().zip(expected) {
        assert!(
            (g - e).abs() <= rel * e.abs().max(1.0),
            "{what}: {got:?} vs {expected:?}"
        );
    }
}

fn run_text(data: &str, fit: &str) -> String {
    format!(
        r#"
seed = 5
[data]
source = "csv"
path = "train.csv"
label_columns = ["label"]
standardize = true
{data}
[model]
layers = [
  {{ type = "dense", name = "hidden", units = 8, activation = "tanh" }},
  {{ type = "dense", name = "out", units = 1 }},
]
[compile]
optimizer = {{ type = "adam", learning_rate = 0.01 }}
loss = {{ type = "binary_crossentropy", from_logits = true }}
metrics = ["accuracy"]
[fit]
epochs = 2
batch_size = 16
{fit}
"#
    )
}

fn train(dir: &Path, text: &str) -> kiln::Result<kiln::run::TrainReport> {
    std::fs::write(dir.join("run.toml"), text).unwrap();
    RunFile::from_path(dir.join("run.toml"))?.train(&TrainOptions {
        out: dir.join("out"),
        ..TrainOptions::default()
    })
}

#[test]
fn standardize_adapts_on_the_training_file_only() {
    let dir = temp("files");
    let train_rows = rows(120, 0.0, 1);
    write_csv(&dir.join("train.csv"), &HEADER, &train_rows, IN_ORDER);
    // Test and validation files far from the training data: any of their rows in the
    // statistics would move the mean by more than the tolerance.
    write_csv(
        &dir.join("test.csv"),
        &HEADER,
        &rows(30, 500.0, 2),
        IN_ORDER,
    );
    write_csv(
        &dir.join("val.csv"),
        &HEADER,
        &rows(30, -700.0, 3),
        IN_ORDER,
    );
    let report = train(
        &dir,
        &run_text(
            "test_path = \"test.csv\"\nvalidation_path = \"val.csv\"",
            "",
        ),
    )
    .unwrap();
    let (mean, var) = moments(&train_rows);
    assert_close(
        "mean",
        &weight(&report.model, "standardize/mean"),
        &mean,
        1e-6,
    );
    assert_close(
        "variance",
        &weight(&report.model, "standardize/variance"),
        &var,
        1e-5,
    );
    assert_eq!(weight(&report.model, "standardize/count"), vec![120.0]);
    // The validation file is what fit validated on: val_ terms are in the history, and the
    // test file is the final evaluation.
    let last = report.history.epochs.last().unwrap();
    assert!(last.get("val_loss").is_some(), "{last:?}");
    assert!(report.test.is_some());
    // model.json records the preparation, so evaluate and predict need nothing else.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out/model.json")).unwrap())
            .unwrap();
    let prep = &json["data"]["preprocessing"];
    assert_eq!(prep["standardize"], true);
    assert_eq!(prep["feature_columns"], serde_json::json!(["a", "b", "c"]));
    // `kiln evaluate DIR` evaluates on the test file, as the end of training did.
    let (ok, out, err) = kiln(&["evaluate", "out", "--json"], &dir);
    assert!(ok, "{err}");
    let logs: serde_json::Value = serde_json::from_str(&out).unwrap();
    let test = report.test.as_ref().unwrap().get("loss").unwrap();
    let loss = logs["loss"].as_f64().unwrap_or_else(|| panic!("{out}"));
    assert!((loss - test).abs() < 1e-6, "{loss} vs {test}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn standardize_leaves_out_the_test_split_and_the_validation_tail() {
    use rand::{seq::SliceRandom, SeedableRng};
    let dir = temp("split");
    let all = rows(100, 0.0, 4);
    write_csv(&dir.join("train.csv"), &HEADER, &all, IN_ORDER);
    let report = train(
        &dir,
        &run_text("test_split = 0.2", "validation_split = 0.25"),
    )
    .unwrap();
    // The rows fit trained on: the seed's shuffle without the recorded test rows, then
    // without the last quarter that validation_split keeps.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out/model.json")).unwrap())
            .unwrap();
    let held: Vec<u32> = serde_json::from_value(json["data"]["test_rows"].clone()).unwrap();
    assert_eq!(held.len(), 20);
    let mut order: Vec<u32> = (0..100).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(5));
    let train_order: Vec<u32> = order.into_iter().filter(|r| !held.contains(r)).collect();
    let fitted: Vec<[f64; 4]> = train_order[..60].iter().map(|&r| all[r as usize]).collect();
    let (mean, var) = moments(&fitted);
    assert_close(
        "mean",
        &weight(&report.model, "standardize/mean"),
        &mean,
        1e-6,
    );
    assert_close(
        "variance",
        &weight(&report.model, "standardize/variance"),
        &var,
        1e-5,
    );
    // Not the statistics of all 80 training rows, nor of all 100.
    let (wider, _) = moments(
        &train_order
            .iter()
            .map(|&r| all[r as usize])
            .collect::<Vec<_>>(),
    );
    assert!(wider
        .iter()
        .zip(&mean)
        .any(|(a, b)| (a - b).abs() > 1e-3 * b.abs().max(1.0)));
    std::fs::remove_dir_all(&dir).ok();
}

/// A model that only standardizes and trains nothing: what predict writes is the standardized
/// input itself.
const IDENTITY_RUN: &str = r#"
[data]
source = "csv"
path = "train.csv"
label_columns = ["label"]
standardize = true
[model]
layers = [{ type = "activation", name = "out", activation = "linear" }]
[compile]
optimizer = { type = "sgd", learning_rate = 0.1 }
loss = "mse"
[fit]
epochs = 0
"#;

fn read_predictions(path: &Path) -> Vec<Vec<f64>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
        .collect()
}

#[test]
fn predict_standardizes_as_training_did_and_drops_the_label_column() {
    let dir = temp("predict");
    let train_rows = rows(50, 0.0, 5);
    write_csv(&dir.join("train.csv"), &HEADER, &train_rows, IN_ORDER);
    std::fs::write(dir.join("run.toml"), IDENTITY_RUN).unwrap();
    let (ok, _, err) = kiln(&["train", "run.toml", "--out", "out", "--quiet"], &dir);
    assert!(ok, "{err}");
    let new_rows = rows(7, 3.0, 6);
    // The file as the user has it: features and the label, in another order.
    write_csv(
        &dir.join("with_label.csv"),
        &HEADER,
        &new_rows,
        [3, 2, 0, 1],
    );
    let (ok, _, err) = kiln(
        &[
            "predict",
            "out",
            "--input",
            "with_label.csv",
            "--output",
            "p.csv",
        ],
        &dir,
    );
    assert!(ok, "{err}");
    assert!(
        err.contains("with_label.csv still has the label column `label`: ignored"),
        "{err}"
    );
    assert!(err.contains("another order than training"), "{err}");
    let (mean, var) = moments(&train_rows);
    let got = read_predictions(&dir.join("p.csv"));
    assert_eq!(got.len(), 7);
    for (g, r) in got.iter().zip(&new_rows) {
        let expected: Vec<f64> = (0..3)
            .map(|j| (r[j] - mean[j]) / var[j].sqrt().max(1e-7))
            .collect();
        assert_close("standardized", g, &expected, 1e-4);
    }
    // The features alone give the same predictions, with no note.
    let features: Vec<[f64; 4]> = new_rows.iter().map(|r| [r[0], r[1], r[2], 0.0]).collect();
    let text: String = std::iter::once("a,b,c\n".to_string())
        .chain(
            features
                .iter()
                .map(|r| format!("{},{},{}\n", r[0], r[1], r[2])),
        )
        .collect();
    std::fs::write(dir.join("features.csv"), text).unwrap();
    let (ok, _, err) = kiln(
        &[
            "predict",
            "out",
            "--input",
            "features.csv",
            "--output",
            "q.csv",
        ],
        &dir,
    );
    assert!(ok && !err.contains("note"), "{err}");
    assert_eq!(read_predictions(&dir.join("q.csv")), got);
    // A missing feature and an unknown column are errors naming them.
    std::fs::write(dir.join("missing.csv"), "a,c,label\n1,2,0\n").unwrap();
    let (ok, _, err) = kiln(
        &[
            "predict",
            "out",
            "--input",
            "missing.csv",
            "--output",
            "r.csv",
        ],
        &dir,
    );
    assert!(
        !ok && err.contains("missing.csv has no column `b`"),
        "{err}"
    );
    std::fs::write(dir.join("extra.csv"), "a,b,c,id\n1,2,3,4\n").unwrap();
    let (ok, _, err) = kiln(
        &[
            "predict",
            "out",
            "--input",
            "extra.csv",
            "--output",
            "r.csv",
        ],
        &dir,
    );
    assert!(
        !ok && err.contains("extra.csv has a column `id` the model was not trained on"),
        "{err}"
    );
    assert!(!dir.join("r.csv").exists());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn predict_on_an_npy_with_the_label_column_says_so() {
    let dir = temp("npy");
    write_csv(&dir.join("train.csv"), &HEADER, &rows(20, 0.0, 7), IN_ORDER);
    std::fs::write(dir.join("run.toml"), IDENTITY_RUN).unwrap();
    let (ok, _, err) = kiln(&["train", "run.toml", "--out", "out", "--quiet"], &dir);
    assert!(ok, "{err}");
    // A 2×4 float32 array: the three features and the label.
    let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 4), }";
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend(118u16.to_le_bytes());
    bytes.extend(format!("{dict:<117}\n").bytes());
    for v in [1f32, 2., 3., 0., 4., 5., 6., 1.] {
        bytes.extend(v.to_le_bytes());
    }
    std::fs::write(dir.join("x.npy"), bytes).unwrap();
    let (ok, _, err) = kiln(
        &["predict", "out", "--input", "x.npy", "--output", "p.csv"],
        &dir,
    );
    assert!(!ok);
    assert!(
        err.contains("samples have 4 columns, the model reads 3 features")
            && err.contains("label columns [\"label\"]: does the array still carry them?"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn split_files_that_do_not_fit_are_errors_naming_file_key_and_column() {
    let dir = temp("errors");
    write_csv(&dir.join("train.csv"), &HEADER, &rows(40, 0.0, 8), IN_ORDER);
    write_csv(&dir.join("test.csv"), &HEADER, &rows(10, 0.0, 9), IN_ORDER);
    write_csv(
        &dir.join("swapped.csv"),
        &HEADER,
        &rows(10, 0.0, 9),
        [1, 0, 2, 3],
    );
    std::fs::write(dir.join("other.csv"), "a,b,d,label\n1,2,3,0\n").unwrap();
    let cases = [
        (
            "test_path = \"test.csv\"\ntest_split = 0.2",
            "",
            "`test_path`: test_path and test_split both say which rows are held out",
        ),
        (
            "validation_path = \"test.csv\"",
            "validation_split = 0.2",
            "`validation_split`: [data] validation_path already names the validation data",
        ),
        (
            "test_path = \"other.csv\"",
            "",
            "other.csv has no column `c`, which the training file train.csv has",
        ),
        (
            "validation_path = \"swapped.csv\"",
            "",
            "swapped.csv has its columns in another order than the training file train.csv: \
             column 1 is `a` there and `b` here",
        ),
        ("test_path = \"nowhere.csv\"", "", "nowhere.csv"),
    ];
    for (data, fit, needle) in cases {
        std::fs::write(dir.join("run.toml"), run_text(data, fit)).unwrap();
        let (ok, _, err) = kiln(&["train", "run.toml", "--out", "out", "--quiet"], &dir);
        assert!(!ok, "{data} {fit}: trained");
        assert!(err.contains(needle), "{data} {fit}:\n{err}");
        if !needle.starts_with("nowhere") {
            assert!(err.contains("run.toml line"), "{data} {fit}:\n{err}");
        }
    }
    // One file per split works for csv and npz only.
    let npy = run_text("", "")
        .replace(
            "source = \"csv\"",
            "source = \"npy\"\nx = \"x.npy\"\ny = \"y.npy\"",
        )
        .replace("path = \"train.csv\"", "test_path = \"t.npy\"");
    std::fs::write(dir.join("run.toml"), npy).unwrap();
    let (ok, _, err) = kiln(&["train", "run.toml", "--out", "out", "--quiet"], &dir);
    assert!(
        !ok && err.contains("works with source \"csv\" or \"npz\""),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn resume_keeps_the_statistics_and_refuses_changed_training_data() {
    let dir = temp("resume");
    let train_rows = rows(60, 0.0, 10);
    write_csv(&dir.join("train.csv"), &HEADER, &train_rows, IN_ORDER);
    write_csv(&dir.join("test.csv"), &HEADER, &rows(10, 0.0, 11), IN_ORDER);
    std::fs::write(
        dir.join("run.toml"),
        run_text("test_path = \"test.csv\"", ""),
    )
    .unwrap();
    let (ok, _, err) = kiln(&["train", "run.toml", "--out", "out", "--quiet"], &dir);
    assert!(ok, "{err}");
    let first = std::fs::read(dir.join("out/model.safetensors")).unwrap();
    // Resumed for one more epoch on the same data: the statistics are the checkpoint's.
    let (ok, _, err) = kiln(
        &["train", "--resume", "out", "--epochs", "3", "--quiet"],
        &dir,
    );
    assert!(ok, "{err}");
    let dir_w = dir.join("out/model.safetensors");
    let model = RunFile::from_run_folder(dir.join("out"))
        .unwrap()
        .prepare(None, &candle_core::Device::Cpu)
        .unwrap()
        .model;
    model.load_weights(&dir_w).unwrap();
    let (mean, _) = moments(&train_rows);
    assert_close("mean", &weight(&model, "standardize/mean"), &mean, 1e-6);
    assert_ne!(
        std::fs::read(&dir_w).unwrap(),
        first,
        "the extra epoch trained"
    );
    // Other training data: resume refuses instead of adapting again.
    write_csv(
        &dir.join("train.csv"),
        &HEADER,
        &rows(60, 9.0, 10),
        IN_ORDER,
    );
    let (ok, _, err) = kiln(
        &["train", "--resume", "out", "--epochs", "4", "--quiet"],
        &dir,
    );
    assert!(!ok && err.contains("data_content"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
