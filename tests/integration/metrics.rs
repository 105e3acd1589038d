//! Streaming metrics against real Keras 3.15.1 and scikit-learn 1.9.1
//! (tests/fixtures/metrics_cases.json, made by tests/fixtures/make_metric_cases.py), through the
//! library, `fit`/`evaluate`, and the `kiln` command.
//!
//! Tolerance: relative 1e-5 (plus 1e-7 absolute, for values near 0). Keras accumulates its
//! states in float32, which puts its values up to about 1e-6 (relative) from scikit-learn's
//! float64 ones (the largest gap in the fixture is 1.1e-6, an R² column); kiln accumulates in
//! float64 from the same float32 inputs, so it sits within that of both.

use candle_core::{Device, Tensor};
use kiln::losses::config::JsonParams;
use kiln::metrics::config::metric_from_config;
use kiln::metrics::Metric;
use kiln::prelude::*;
use serde_json::Value;
use std::path::Path;

const RTOL: f64 = 1e-5;
const ATOL: f64 = 1e-7;

fn fixture() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/metrics_cases.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn matrix(v: &Value) -> Tensor {
    let rows: Vec<Vec<f32>> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    let (n, c) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (n, c), &Device::Cpu).unwrap()
}

fn vector(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn close(got: &[f64], want: &[f64]) -> bool {
    got.len() == want.len()
        && got
            .iter()
            .zip(want)
            .all(|(g, w)| (g - w).abs() <= ATOL + RTOL * w.abs())
}

/// Every case, streamed batch by batch as the fixture splits them, equals Keras' stateful
/// metric and, where scikit-learn defines the same quantity, scikit-learn's value on all
/// samples at once; and where the mean of the per-batch values differs from the epoch value,
/// kiln's value is the epoch value.
#[test]
fn every_case_matches_keras_and_scikit_learn() {
    let f = fixture();
    let cases = f["cases"].as_array().unwrap();
    assert!(cases.len() >= 90, "only {} cases", cases.len());
    let (mut against_sklearn, mut split_matters) = (0, 0);
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let data = &f["datasets"][case["dataset"].as_str().unwrap()];
        let (y_true, y_pred) = (matrix(&data["y_true"]), matrix(&data["y_pred"]));
        let weights = Tensor::new(
            vector(&data["sample_weight"])
                .iter()
                .map(|w| *w as f32)
                .collect::<Vec<_>>(),
            &Device::Cpu,
        )
        .unwrap();
        let name = case["name"].as_str().unwrap();
        let place = format!("metrics_cases.json case {i}");
        let mut metric = metric_from_config(name, &JsonParams::new(&case["config"], &place))
            .unwrap_or_else(|e| panic!("{place}: {e}"));
        let mut start = 0;
        for size in data["batches"].as_array().unwrap() {
            let size = size.as_u64().unwrap() as usize;
            let w = weights.narrow(0, start, size).unwrap();
            metric
                .update(
                    &y_true.narrow(0, start, size).unwrap(),
                    &y_pred.narrow(0, start, size).unwrap(),
                    case["weighted"].as_bool().unwrap().then_some(&w),
                )
                .unwrap_or_else(|e| panic!("{place}: {e}"));
            start += size;
        }
        let got = metric.result();
        let keras = vector(&case["keras"]);
        let describe = format!(
            "case {i}: {name} {} on {} (weighted: {}): kiln {got:?}",
            case["config"], case["dataset"], case["weighted"]
        );
        if !close(&got, &keras) {
            failures.push(format!("{describe}, Keras {keras:?}"));
        }
        if let Some(sk) = case["sklearn"].as_array() {
            let sk: Vec<f64> = sk.iter().map(|x| x.as_f64().unwrap()).collect();
            against_sklearn += 1;
            if !close(&got, &sk) {
                failures.push(format!("{describe}, scikit-learn {sk:?}"));
            }
        }
        let batch_mean = vector(&case["batch_mean"]);
        if !close(&batch_mean, &keras) {
            split_matters += 1;
            assert!(!close(&got, &batch_mean), "{describe} is the batch mean");
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        against_sklearn >= 60,
        "only {against_sklearn} against sklearn"
    );
    // The uneven batches do show the difference between streaming and batch means.
    assert!(
        split_matters >= 80,
        "only {split_matters} cases tell the two apart"
    );
}

/// Keras' AUC (200 buckets) differs from scikit-learn's exact ROC AUC on scores that share
/// buckets across the classes, and reaches it with enough thresholds that every score has its
/// own bucket; the interpolated PR area stays apart from average precision (a step sum).
#[test]
fn bucketed_auc_reaches_the_exact_one_with_enough_thresholds() {
    let f = fixture();
    let data = &f["datasets"]["binary"];
    let (t, p) = (matrix(&data["y_true"]), matrix(&data["y_pred"]));
    let w: Vec<f32> = vector(&data["sample_weight"])
        .iter()
        .map(|x| *x as f32)
        .collect();
    let w = Tensor::new(w, &Device::Cpu).unwrap();
    let exact = &f["binary_exact"];
    let auc = |n: usize, curve: kiln::metrics::AucCurve, weight: Option<&Tensor>| {
        let mut m = kiln::metrics::Auc::new()
            .num_thresholds(n)
            .unwrap()
            .curve(curve);
        m.update(&t, &p, weight).unwrap();
        m.result()[0]
    };
    use kiln::metrics::AucCurve::{Pr, Roc};
    let roc = exact["roc_auc"].as_f64().unwrap();
    assert!((auc(200, Roc, None) - roc).abs() > 1e-3);
    assert!(
        (auc(1_000_001, Roc, None) - roc).abs() < 1e-6,
        "{}",
        auc(1_000_001, Roc, None)
    );
    let weighted = exact["roc_auc_weighted"].as_f64().unwrap();
    assert!((auc(1_000_001, Roc, Some(&w)) - weighted).abs() < 1e-6);
    let ap = exact["average_precision"].as_f64().unwrap();
    assert!((auc(1_000_001, Pr, None) - ap).abs() > 1e-4);
}

/// The two-class and one-hot scores of a small trained classifier, for the training-path tests.
fn blobs(n: usize) -> Dataset {
    let d = Device::Cpu;
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    for i in 0..n {
        let class = i % 3;
        let jitter = ((i * 37) % 101) as f32 / 101.0 - 0.5;
        let jitter2 = ((i * 53) % 97) as f32 / 97.0 - 0.5;
        xs.extend([
            class as f32 + 1.5 * jitter,
            (class as f32 - 1.0) * 0.5 + jitter2,
        ]);
        ys.extend((0..3).map(|c| f32::from(u8::from(c == class))));
    }
    Dataset::new(
        Tensor::from_vec(xs, (n, 2), &d).unwrap(),
        Tensor::from_vec(ys, (n, 3), &d).unwrap(),
    )
    .unwrap()
}

fn classifier() -> Model {
    let x = Input::new([2]);
    let h = Dense::new(8)
        .activation(Activation::Tanh)
        .apply(&x)
        .unwrap();
    let y = Dense::new(3)
        .activation(Activation::Softmax)
        .with_name("class")
        .apply(&h)
        .unwrap();
    Model::new(&[x], &[y]).unwrap()
}

/// `evaluate` reports the metric of all samples, whatever the batch size, and it equals the
/// metric computed on `predict`'s outputs in one go.
#[test]
fn evaluate_streams_over_the_whole_data_set() {
    let data = blobs(90);
    let mut model = classifier();
    model
        .compile(
            Compile::new(Adam::new(0.05))
                .loss(CategoricalCrossentropy::new())
                .metric("auc")
                .metric(kiln::metrics::F1Score::new().average(kiln::metrics::Average::Macro))
                .metric(kiln::metrics::TopKCategoricalAccuracy::new(2))
                .metric(kiln::metrics::Precision::new().class_id(1)),
        )
        .unwrap();
    model
        .fit(&data, Fit::new().epochs(3).batch_size(16).quiet())
        .unwrap();
    let whole = model.evaluate(&data, 1000).unwrap();
    let pred = model.predict(data.inputs(), 1000).unwrap();
    let mut auc = kiln::metrics::Auc::new();
    auc.update(&data.targets()[0], &pred[0], None).unwrap();
    assert!((whole.get("auc").unwrap() - auc.result()[0]).abs() < 1e-12);
    for batch in [1, 7, 32] {
        let logs = model.evaluate(&data, batch).unwrap();
        for key in ["auc", "f1_score", "top_k_categorical_accuracy", "precision"] {
            let (a, b) = (logs.get(key).unwrap(), whole.get(key).unwrap());
            assert!((a - b).abs() < 1e-9, "{key} at batch {batch}: {a} vs {b}");
        }
    }
}

/// Weighted metrics see the sample weights, plain ones do not (as Keras); names follow Keras
/// (`weighted_<name>` on a clash, `<output>_<name>` with several outputs, `val_` for
/// validation), and a per-class result is logged per class.
#[test]
fn weights_names_and_validation_follow_keras() {
    let data = blobs(60);
    let n = data.len();
    let w: Vec<f32> = (0..n).map(|i| if i % 3 == 0 { 0.0 } else { 1.0 }).collect();
    let weighted = data
        .clone()
        .with_sample_weight(Tensor::new(w, &Device::Cpu).unwrap())
        .unwrap();
    let mut model = classifier();
    model
        .compile(
            Compile::new(Sgd::new(0.0))
                .loss(CategoricalCrossentropy::new())
                .metric("categorical_accuracy")
                .weighted_metric("categorical_accuracy")
                .metric("f1_score"),
        )
        .unwrap();
    assert_eq!(
        model.metric_names(),
        vec![
            "categorical_accuracy",
            "weighted_categorical_accuracy",
            "f1_score"
        ]
    );
    let logs = model.evaluate(&weighted, 16).unwrap();
    // Class 0 is every third sample: weight 0 removes it from the weighted metric alone.
    let pred = model.predict(data.inputs(), 100).unwrap()[0]
        .argmax(1)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap();
    let hits: Vec<bool> = pred
        .iter()
        .enumerate()
        .map(|(i, p)| *p as usize == i % 3)
        .collect();
    let plain = hits.iter().filter(|h| **h).count() as f64 / n as f64;
    let kept: Vec<bool> = hits
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 != 0)
        .map(|(_, h)| *h)
        .collect();
    let weighted_acc = kept.iter().filter(|h| **h).count() as f64 / kept.len() as f64;
    assert!((logs.get("categorical_accuracy").unwrap() - plain).abs() < 1e-9);
    assert!((logs.get("weighted_categorical_accuracy").unwrap() - weighted_acc).abs() < 1e-9);
    for k in ["f1_score_0", "f1_score_1", "f1_score_2"] {
        assert!(logs.get(k).is_some(), "{k} missing from {logs:?}");
    }
    let history = model
        .fit(&data, Fit::new().epochs(1).validation_split(0.25).quiet())
        .unwrap();
    let last = history.last().unwrap();
    for k in [
        "f1_score_2",
        "val_f1_score_2",
        "val_weighted_categorical_accuracy",
    ] {
        assert!(last.get(k).is_some(), "{k} missing from {last:?}");
    }

    // Two outputs: `<output>_<metric>`.
    let x = Input::new([2]);
    let a = Dense::new(3).with_name("a").apply(&x).unwrap();
    let b = Dense::new(1).with_name("b").apply(&x).unwrap();
    let mut two = Model::new(&[x], &[a, b]).unwrap();
    two.compile(
        Compile::new(Sgd::new(0.0))
            .loss("mse")
            .metric_for("a", "top_k_categorical_accuracy")
            .metric_for("b", "r2_score")
            .metric("root_mean_squared_error"),
    )
    .unwrap();
    assert_eq!(
        two.metric_names(),
        vec![
            "a_top_k_categorical_accuracy",
            "b_r2_score",
            "a_root_mean_squared_error",
            "b_root_mean_squared_error"
        ]
    );
}

/// A masked sequence output: padded steps count in no metric, streaming ones included.
#[test]
fn masks_leave_padding_out_of_streaming_metrics() {
    let d = Device::Cpu;
    // Tokens 1..=3, padded with 0; the label of a token is (token == 2).
    let tokens = Tensor::new(&[[1f32, 2., 0., 0.], [2., 3., 1., 0.]], &d).unwrap();
    let labels = Tensor::new(&[[[0f32], [1.], [1.], [1.]], [[1.], [0.], [0.], [1.]]], &d).unwrap();
    let x = Input::new([4]);
    let e = Embedding::new(4, 2).mask_zero(true).apply(&x).unwrap();
    let y = Dense::new(1)
        .activation(Activation::Sigmoid)
        .apply(&e)
        .unwrap();
    let mut model = Model::new(&[x], &[y]).unwrap();
    model
        .compile(
            Compile::new(Sgd::new(0.0))
                .loss("binary_crossentropy")
                .metric("auc")
                .metric(kiln::metrics::Recall::new().threshold(0.0).unwrap()),
        )
        .unwrap();
    let data = Dataset::new(tokens.clone(), labels).unwrap();
    let logs = model.evaluate(&data, 2).unwrap();
    // The padded steps are all labelled 1: counted, recall at threshold 0 would still be 1,
    // but the AUC would change. Compare with the metric on the five real steps alone.
    let pred = model.predict(&[tokens], 2).unwrap()[0]
        .flatten_all()
        .unwrap();
    let pred = pred.to_vec1::<f32>().unwrap();
    let real = [0usize, 1, 4, 5, 6];
    let p = Tensor::new(real.map(|i| pred[i]).as_slice(), &d).unwrap();
    let t = Tensor::new(&[0f32, 1., 1., 0., 0.], &d).unwrap();
    let mut auc = kiln::metrics::Auc::new();
    auc.update(&t, &p, None).unwrap();
    assert!((logs.get("auc").unwrap() - auc.result()[0]).abs() < 1e-12);
    assert_eq!(logs.get("recall"), Some(1.0));
}

fn kiln_cmd(args: &[&str], dir: &Path) -> (bool, String, String) {
    crate::support::kiln_in(args, dir)
}

fn temp(name: &str) -> std::path::PathBuf {
    crate::support::temp("metrics", name)
}

const RUN: &str = r#"
seed = 1
[data]
source = "digits"
test_split = 0.2
one_hot = 10

[model]
layers = [{ type = "dense", name = "out", units = 10, activation = "softmax" }]

[compile]
optimizer = { type = "adam", learning_rate = 0.01 }
loss = "categorical_crossentropy"
metrics = [
  "categorical_accuracy",
  { name = "top_k_categorical_accuracy", k = 3 },
  { name = "f1_score", average = "macro", as = "macro_f1" },
  { name = "auc", curve = "PR", as = "pr_auc" },
]
weighted_metrics = ["categorical_accuracy"]

[fit]
epochs = 2
batch_size = 50
validation_split = 0.2
"#;

/// A run file with metrics trains, and history.json holds every metric under Keras' names, for
/// training and validation; the top-3 accuracy is at least the accuracy.
#[test]
fn run_file_metrics_reach_history_json() {
    let dir = temp("history");
    std::fs::write(dir.join("run.toml"), RUN).unwrap();
    let (ok, _, err) = kiln_cmd(&["train", "run.toml", "--quiet", "--out", "out"], &dir);
    assert!(ok, "{err}");
    let history: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out/history.json")).unwrap())
            .unwrap();
    let text = history.to_string();
    for key in [
        "categorical_accuracy",
        "top_k_categorical_accuracy",
        "macro_f1",
        "pr_auc",
        "weighted_categorical_accuracy",
        "val_top_k_categorical_accuracy",
        "val_macro_f1",
        "val_pr_auc",
    ] {
        assert!(
            text.contains(&format!("\"{key}\"")),
            "{key} missing: {text}"
        );
    }
    let series = |k: &str| -> Vec<f64> {
        history[k]
            .as_array()
            .unwrap_or_else(|| panic!("{k} missing: {text}"))
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    let (acc, top3) = (
        series("val_categorical_accuracy"),
        series("val_top_k_categorical_accuracy"),
    );
    assert_eq!(acc.len(), 2);
    for (a, t) in acc.iter().zip(&top3) {
        assert!(t >= a && *a > 0.1, "{acc:?} {top3:?}");
    }
    // No sample weights: the weighted accuracy is the accuracy.
    assert_eq!(
        series("weighted_categorical_accuracy"),
        series("categorical_accuracy")
    );
    for k in ["pr_auc", "macro_f1", "val_pr_auc"] {
        assert!(series(k).iter().all(|v| (0.0..=1.0).contains(v)), "{k}");
    }
}

/// Unknown metric names and keys, and bad values, are errors naming the file, line and key.
#[test]
fn run_file_metric_errors_name_the_line_and_key() {
    let dir = temp("errors");
    for (bad, needles) in [
        (
            r#"metrics = ["accuracy", "f1"]"#,
            &["run.toml line", "unknown metric `f1`", "f1_score"][..],
        ),
        (
            r#"metrics = [{ name = "top_k_categorical_accuracy", kk = 3 }]"#,
            &["run.toml line", "kk", "it takes only k"][..],
        ),
        (
            r#"metrics = [{ name = "auc", num_thresholds = 1 }]"#,
            &["run.toml line", "num_thresholds", ">= 2"][..],
        ),
        (
            r#"metrics = [{ name = "f1_score", average = "mean" }]"#,
            &["run.toml line", "average", "\"macro\""][..],
        ),
        (
            r#"metrics = [{ curve = "PR" }]"#,
            &["run.toml line", "needs `name`"][..],
        ),
        (
            r#"metrics = [{ name = "auc", as = "" }]"#,
            &["run.toml line", "`as`", "must not be empty"][..],
        ),
        (
            r#"metrics = { nope = ["auc"] }"#,
            &["run.toml line", "`nope` is not an output"][..],
        ),
    ] {
        // The whole `metrics = [...]` list of RUN, replaced by the bad one.
        let start = RUN.find("metrics = [").unwrap();
        let end = RUN.find("]\nweighted_metrics").unwrap() + 1;
        let run = format!("{}{bad}{}", &RUN[..start], &RUN[end..]);
        std::fs::write(dir.join("run.toml"), run).unwrap();
        let (ok, _, err) = kiln_cmd(&["train", "run.toml", "--quiet", "--out", "out"], &dir);
        assert!(!ok, "{bad} was accepted");
        for n in needles {
            assert!(err.contains(n), "{bad}: `{n}` missing from: {err}");
        }
    }
}
