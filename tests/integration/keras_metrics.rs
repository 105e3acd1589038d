//! Keras metrics carried by a `.keras` file's compile_config: by name (`"mape"`, `"auc"`) and
//! as objects with their parameters (`AUC(curve="PR")`, `Precision(thresholds=[0.3, 0.7])`),
//! weighted and not. tests/fixtures/keras/metrics.json holds Keras 3.15.1's `evaluate` of
//! metrics.keras with sample weights (make_keras_metrics.py); kiln imports the file, evaluates
//! the same data, and must give every metric Keras logs, under Keras' name, with Keras' value;
//! then exports the model and reads it back to the same metrics.

use candle_core::{Device, Tensor};
use kiln::prelude::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/keras/{name}"))
}

fn tensor(v: &Value) -> Tensor {
    fn flat(v: &Value, out: &mut Vec<f32>, dims: &mut Vec<usize>, depth: usize) {
        match v {
            Value::Array(items) => {
                if dims.len() == depth {
                    dims.push(items.len());
                }
                for i in items {
                    flat(i, out, dims, depth + 1);
                }
            }
            x => out.push(x.as_f64().unwrap() as f32),
        }
    }
    let (mut out, mut dims) = (Vec::new(), Vec::new());
    flat(v, &mut out, &mut dims, 0);
    Tensor::from_vec(out, dims, &Device::Cpu).unwrap()
}

fn case() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("metrics.json")).unwrap()).unwrap()
}

fn evaluate(model: &Model, case: &Value) -> Logs {
    let x = tensor(&case["inputs"][0]);
    let t = &case["targets"];
    let ys = ["prob", "cls", "sp", "reg", "rel"]
        .map(|k| tensor(&t[k]))
        .to_vec();
    let data = Dataset::multi(vec![x], ys)
        .unwrap()
        .with_sample_weight(tensor(&case["sample_weight"]))
        .unwrap();
    model.evaluate(&data, 24).unwrap()
}

/// Keras' result as kiln logs it: a vector metric as `<name>_0`, `<name>_1`, ….
fn expected(case: &Value) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for (k, v) in case["evaluate"].as_object().unwrap() {
        match v {
            Value::Array(xs) => {
                for (i, x) in xs.iter().enumerate() {
                    out.push((format!("{k}_{i}"), x.as_f64().unwrap()));
                }
            }
            x => out.push((k.clone(), x.as_f64().unwrap())),
        }
    }
    out
}

fn assert_matches_keras(logs: &Logs, case: &Value, what: &str) {
    let want = expected(case);
    for (k, v) in &want {
        let got = logs.get(k).unwrap_or_else(|| {
            panic!(
                "{what}: kiln logs no `{k}`; it logs {:?}",
                logs.keys().collect::<Vec<_>>()
            )
        });
        let tol = 2e-5 * v.abs().max(1.0);
        assert!((got - v).abs() <= tol, "{what}: {k}: kiln {got}, Keras {v}");
    }
    let mut extra: Vec<&str> = logs
        .keys()
        .filter(|k| !want.iter().any(|(w, _)| w == k))
        .collect();
    extra.sort();
    assert!(
        extra.is_empty(),
        "{what}: kiln logs what Keras does not: {extra:?}"
    );
}

#[test]
fn metrics_by_name_and_as_objects_match_keras_evaluate() {
    let case = case();
    let model = Model::from_keras(fixture("metrics.keras")).unwrap();
    assert_matches_keras(&evaluate(&model, &case), &case, "imported");
}

#[test]
fn exported_metrics_keep_their_class_parameters_and_names() {
    let case = case();
    let model = Model::from_keras(fixture("metrics.keras")).unwrap();
    // KILN_EXPORT_DIR keeps the export, for check_metrics_export.py to load in real Keras.
    let keep = std::env::var_os("KILN_EXPORT_DIR").map(PathBuf::from);
    let dir = keep.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("kiln-keras-metrics-{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("metrics_export.keras");
    model.save_keras(&out).unwrap();
    let back = Model::from_keras(&out).unwrap();
    assert_matches_keras(&evaluate(&back, &case), &case, "exported and re-imported");
    // The exported compile_config writes each metric as Keras did: a name stays a name, an
    // object keeps its class and every parameter.
    let exported = {
        use std::io::Read;
        let mut zip = zip::ZipArchive::new(std::fs::File::open(&out).unwrap()).unwrap();
        let mut text = String::new();
        zip.by_name("config.json")
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        serde_json::from_str::<Value>(&text).unwrap()["compile_config"].clone()
    };
    let keras = &case["compile_config"];
    for key in ["metrics", "weighted_metrics"] {
        for (output, list) in keras[key].as_object().unwrap() {
            let ours = exported[key][output].as_array().unwrap();
            let theirs = list.as_array().unwrap();
            assert_eq!(ours.len(), theirs.len(), "{key}.{output}");
            for (a, b) in ours.iter().zip(theirs) {
                match b {
                    Value::String(_) => assert_eq!(a, b, "{key}.{output}"),
                    _ => {
                        assert_eq!(a["class_name"], b["class_name"], "{key}.{output}");
                        for (p, v) in b["config"].as_object().unwrap() {
                            // kiln infers AUC's num_labels from the data, as Keras can.
                            if p == "num_labels" {
                                continue;
                            }
                            assert_eq!(&a["config"][p], v, "{key}.{output}: {b}: `{p}`");
                        }
                    }
                }
            }
        }
    }
    if keep.is_none() {
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// The import error of metrics.keras with its compile_config edited by `edit`.
fn refusal(tag: &str, edit: impl FnOnce(&mut Value)) -> String {
    let path = super::keras_files::edited("metrics.keras", tag, |v| edit(&mut v["compile_config"]));
    let msg = match Model::from_keras(&path) {
        Ok(_) => panic!("{tag}: imported"),
        Err(e) => e.to_string(),
    };
    std::fs::remove_file(&path).ok();
    msg
}

#[test]
fn a_metric_kiln_lacks_or_a_bad_parameter_is_an_error_naming_it_and_its_place() {
    let msg = refusal("metric-iou", |c| {
        c["metrics"]["reg"][0] = serde_json::json!({
            "module": "keras.metrics", "class_name": "MeanIoU",
            "config": {"name": "iou", "dtype": "float32", "num_classes": 2},
            "registered_name": null
        })
    });
    assert!(
        msg.contains("`MeanIoU`") && msg.contains("metrics.reg[0]"),
        "{msg}"
    );
    let msg = refusal("metric-curve", |c| {
        c["metrics"]["prob"][3]["config"]["curve"] = "DET".into()
    });
    assert!(
        msg.contains("curve") && msg.contains("DET") && msg.contains("metrics.prob[3]"),
        "{msg}"
    );
    let msg = refusal("metric-thresholds", |c| {
        c["metrics"]["prob"][3]["config"]["thresholds"] = serde_json::json!([0.2, 0.5])
    });
    assert!(msg.contains("thresholds"), "{msg}");
    let msg = refusal("metric-k", |c| {
        c["metrics"]["cls"][1]["config"]["k"] = "2".into()
    });
    assert!(
        msg.contains("`k`") && msg.contains("metrics.cls[1]"),
        "{msg}"
    );
}
