//! Keras 3's optimizers carried by a `.keras` compile_config: Nadam, Adamax, Adagrad, Adadelta
//! and Lion with non-default hyperparameters, weight decay on SGD/Adam/RMSprop/…, AMSGrad and
//! clipping. tests/fixtures/keras/optimizers.json (make_keras_optimizers.py) holds, per
//! configuration, the compile_config Keras 3.15.1 wrote and Keras' weights after 3
//! `train_on_batch` steps on one batch; kiln imports optimizers.keras with that compile_config,
//! takes the same 3 steps and must land on Keras' weights. Then it exports, reads its export
//! back, and the optimizer config (and so the steps) must survive. With `KILN_EXPORT_DIR=DIR`
//! the exports and kiln's weights are written there for check_optimizer_exports.py.

use candle_core::{Device, Tensor};
use kiln::prelude::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/keras/{name}"))
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-keras-optimizers-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn cases() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("optimizers.json")).unwrap()).unwrap()
}

fn tensor(v: &Value) -> Tensor {
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
    let (n, d) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (n, d), &Device::Cpu).unwrap()
}

fn flat(v: &Value, out: &mut Vec<f64>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flat(x, out)),
        x => out.push(x.as_f64().unwrap()),
    }
}

/// optimizers.keras with its compile_config replaced by `compile_config`, at `path`.
fn with_compile_config(compile_config: &Value, path: &Path) {
    let mut zip =
        zip::ZipArchive::new(std::fs::File::open(fixture("optimizers.keras")).unwrap()).unwrap();
    let mut out = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..zip.len() {
        let mut f = zip.by_index(i).unwrap();
        let name = f.name().unwrap().to_string();
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).unwrap();
        if name == "config.json" {
            let mut config: Value = serde_json::from_slice(&bytes).unwrap();
            config["compile_config"] = compile_config.clone();
            bytes = serde_json::to_vec(&config).unwrap();
        }
        out.start_file(name, options).unwrap();
        out.write_all(&bytes).unwrap();
    }
    out.finish().unwrap();
}

fn compile_config_of(path: &Path) -> Value {
    let mut zip = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    let mut text = String::new();
    zip.by_name("config.json")
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    serde_json::from_str::<Value>(&text).unwrap()["compile_config"].clone()
}

/// Every weight, by name, after 3 `train_on_batch` steps on the batch.
fn three_steps(model: &mut Model, batch: &Dataset) -> Vec<(String, Vec<f64>)> {
    for _ in 0..3 {
        model.train_on_batch(batch).unwrap();
    }
    weights(model)
}

fn weights(model: &Model) -> Vec<(String, Vec<f64>)> {
    model
        .weights()
        .iter()
        .map(|w| {
            let v: Vec<f32> = w.var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            (w.name.clone(), v.into_iter().map(f64::from).collect())
        })
        .collect()
}

fn batch(all: &Value) -> Dataset {
    Dataset::new(tensor(&all["x"]), tensor(&all["y"])).unwrap()
}

/// The worst `|kiln - keras| / max(|keras|, 1)` over every weight of a case.
fn worst_diff(name: &str, kiln: &[(String, Vec<f64>)], keras: &Value) -> f64 {
    let keras = keras.as_object().unwrap();
    assert_eq!(kiln.len(), keras.len(), "{name}: weight count");
    let mut worst = 0.0f64;
    for (w, got) in kiln {
        let mut want = Vec::new();
        flat(
            keras
                .get(w)
                .unwrap_or_else(|| panic!("{name}: Keras has no weight `{w}`")),
            &mut want,
        );
        assert_eq!(got.len(), want.len(), "{name}: {w}");
        for (g, k) in got.iter().zip(&want) {
            worst = worst.max((g - k).abs() / k.abs().max(1.0));
        }
    }
    worst
}

/// Every hyperparameter Keras wrote is in kiln's export with the same value (the name aside,
/// which kiln writes as its own).
fn assert_same_optimizer(name: &str, keras: &Value, kiln: &Value) {
    assert_eq!(keras["class_name"], kiln["class_name"], "{name}");
    let (k, o) = (
        keras["config"].as_object().unwrap(),
        kiln["config"].as_object().unwrap(),
    );
    let mut keys: Vec<&String> = k.keys().filter(|k| *k != "name").collect();
    let mut theirs: Vec<&String> = o.keys().filter(|k| *k != "name").collect();
    keys.sort();
    theirs.sort();
    assert_eq!(keys, theirs, "{name}: the keys of the optimizer config");
    for key in keys {
        let (a, b) = (&k[key], &o[key]);
        match (a.as_f64(), b.as_f64()) {
            (Some(x), Some(y)) => assert!(
                (x - y).abs() <= 1e-12 * x.abs().max(1.0),
                "{name}: {key}: Keras {x}, kiln {y}"
            ),
            _ => assert_eq!(a, b, "{name}: {key}"),
        }
    }
}

/// 3 kiln steps of each imported configuration land on Keras' weights; kiln's export carries
/// the same optimizer config and, read back, takes the same steps.
#[test]
fn imported_optimizers_take_keras_steps_and_export_their_configuration() {
    let all = cases();
    let data = batch(&all);
    let export_dir = std::env::var("KILN_EXPORT_DIR").ok();
    let mut report = Vec::new();
    for (name, case) in all["cases"].as_object().unwrap() {
        let path = temp(&format!("{name}.keras"));
        with_compile_config(&case["compile_config"], &path);
        let mut model = Model::from_keras(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let after = three_steps(&mut model, &data);
        let worst = worst_diff(name, &after, &case["weights_after"]);
        assert!(worst <= 1e-5, "{name}: worst relative difference {worst:e}");
        report.push(format!("{name}: {worst:.1e}"));

        let fresh = Model::from_keras(&path).unwrap();
        let exported = temp(&format!("{name}.exported.keras"));
        fresh.save_keras(&exported).unwrap();
        assert_same_optimizer(
            name,
            &case["compile_config"]["optimizer"],
            &compile_config_of(&exported)["optimizer"],
        );
        let mut back = Model::from_keras(&exported).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            three_steps(&mut back, &data),
            after,
            "{name}: the re-imported export"
        );
        if let Some(dir) = &export_dir {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::copy(&exported, Path::new(dir).join(format!("{name}.keras"))).unwrap();
            let w: serde_json::Map<String, Value> = after
                .iter()
                .map(|(n, v)| (n.clone(), serde_json::json!(v)))
                .collect();
            std::fs::write(
                Path::new(dir).join(format!("{name}.json")),
                serde_json::json!({ "x": all["x"], "y": all["y"], "kiln_weights_after": w })
                    .to_string(),
            )
            .unwrap();
        }
    }
    eprintln!(
        "kiln vs Keras, worst relative weight difference after 3 steps:\n  {}",
        report.join("\n  ")
    );
}

/// Training 2 steps, a checkpoint, a fresh import restored from it and 1 more step gives the
/// weights of 3 straight steps, bit for bit: every slot (and Nadam's momentum product, from the
/// restored step count) comes back.
#[test]
fn a_checkpoint_resumes_the_new_optimizers_exactly() {
    let all = cases();
    let data = batch(&all);
    for name in [
        "nadam",
        "adadelta",
        "adagrad_clipvalue",
        "adam_amsgrad",
        "lion",
    ] {
        let path = temp(&format!("resume-{name}.keras"));
        with_compile_config(&all["cases"][name]["compile_config"], &path);
        let mut straight = Model::from_keras(&path).unwrap();
        let want = three_steps(&mut straight, &data);

        let mut first = Model::from_keras(&path).unwrap();
        for _ in 0..2 {
            first.train_on_batch(&data).unwrap();
        }
        let dir = temp(&format!("ckpt-{name}"));
        first
            .save_checkpoint(&dir, "last", 0, &History::default())
            .unwrap();
        let mut resumed = Model::from_keras(&path).unwrap();
        resumed.load_checkpoint(&dir, "last").unwrap();
        resumed.train_on_batch(&data).unwrap();
        assert_eq!(weights(&resumed), want, "{name}");
    }
}

/// What kiln cannot honour is refused, naming the key: an unimplemented Keras optimizer, EMA,
/// an exclusion list for weight decay, AdamW without a decay, an out-of-range hyperparameter.
#[test]
fn unsupported_optimizer_settings_are_refused_by_name() {
    let all = cases();
    let base = all["cases"]["nadam"]["compile_config"].clone();
    let refuse = |edit: &dyn Fn(&mut Value), what: &str, needle: &str| {
        let mut cc = base.clone();
        edit(&mut cc);
        let path = temp(&format!("refuse-{}.keras", needle.replace(' ', "_")));
        with_compile_config(&cc, &path);
        let err = Model::from_keras(&path)
            .err()
            .unwrap_or_else(|| panic!("{what}: accepted"));
        let msg = err.to_string();
        assert!(msg.contains(needle), "{what}: {msg}");
    };
    refuse(
        &|cc| cc["optimizer"]["class_name"] = "Ftrl".into(),
        "Ftrl",
        "does not implement Keras' `Ftrl`",
    );
    refuse(
        &|cc| cc["optimizer"]["config"]["use_ema"] = true.into(),
        "EMA",
        "use_ema",
    );
    refuse(
        &|cc| cc["optimizer"]["config"]["exclude_from_weight_decay"] = serde_json::json!(["bias"]),
        "exclusions",
        "exclude_from_weight_decay",
    );
    refuse(
        &|cc| cc["optimizer"]["config"]["beta_1"] = 1.0.into(),
        "beta_1 = 1",
        "beta_1",
    );
    refuse(
        &|cc| cc["optimizer"]["config"]["momentum_decay"] = 0.004.into(),
        "an unknown key",
        "momentum_decay",
    );
    refuse(
        &|cc| {
            cc["optimizer"]["class_name"] = "AdamW".into();
            let c = &mut cc["optimizer"]["config"];
            c["amsgrad"] = false.into();
            c["weight_decay"] = Value::Null;
        },
        "AdamW without decay",
        "weight_decay",
    );
}
