//! The importer against the class of Keras models, not hand-picked ones: every random model
//! `tests/fixtures/keras/make_keras_random.py` wrote with real Keras 3.15.1 (random layers,
//! options, branches, losses and optimizers from a fixed seed) is imported, predicts as Keras
//! did, takes one training step to Keras' weights, and exports and re-imports unchanged. Every
//! failing model is named by its file, all of them in one report.

use super::keras_files::{assert_close, flat, shape, tensor, values};
use candle_core::Tensor;
use kiln::prelude::*;
use serde_json::Value;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// A check of one model: what went wrong, for the report.
type Outcome<T = ()> = std::result::Result<T, String>;

/// The committed set, or another one the generator wrote (`KILN_KERAS_RANDOM_DIR`).
fn folder() -> PathBuf {
    match std::env::var_os("KILN_KERAS_RANDOM_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keras/random"),
    }
}

/// Every generated model, by file name, with its case (the JSON beside it).
fn cases() -> Vec<(String, Value)> {
    let mut names: Vec<String> = std::fs::read_dir(folder())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".keras"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let json = folder().join(n.replace(".keras", ".json"));
            let text = std::fs::read_to_string(&json).unwrap();
            (n, serde_json::from_str(&text).unwrap())
        })
        .collect()
}

fn import(file: &str) -> Outcome<Model> {
    Model::from_keras(folder().join(file)).map_err(|e| format!("import: {e}"))
}

fn inputs(list: &Value) -> Vec<Tensor> {
    list.as_array().unwrap().iter().map(tensor).collect()
}

/// The predictions match Keras' at the case's tolerance.
fn predicts(file: &str, c: &Value) -> Outcome {
    let model = import(file)?;
    let got = model
        .predict(&inputs(&c["inputs"]), 64)
        .map_err(|e| format!("predict: {e}"))?;
    let want = c["predictions"].as_array().unwrap();
    if got.len() != want.len() {
        return Err(format!("{} outputs, Keras {}", got.len(), want.len()));
    }
    let rtol = c["rtol"].as_f64().unwrap();
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        if g.dims() != shape(w).as_slice() {
            return Err(format!(
                "output {i}: shape {:?}, Keras {:?}",
                g.dims(),
                shape(w)
            ));
        }
        let mut wv = Vec::new();
        flat(w, &mut wv);
        assert_close(&format!("output {i}"), &wv, &values(g), rtol);
    }
    Ok(())
}

/// One fit step of the whole batch gives Keras' loss and weights, and kiln has exactly the
/// weights Keras has.
fn trains(file: &str, c: &Value) -> Outcome {
    let Some(train) = c.get("train") else {
        return Ok(());
    };
    let mut model = import(file)?;
    let want = train["weights_after"].as_object().unwrap();
    // kiln has every weight Keras has, and no other but the statistics a Normalization layer
    // holds as non-trainable weights where Keras was given them as constants.
    let weights = model.weights();
    let missing: Vec<&String> = want
        .keys()
        .filter(|k| !weights.iter().any(|w| &w.name == *k))
        .collect();
    let extra: Vec<&str> = weights
        .iter()
        .filter(|w| !want.contains_key(&w.name))
        .filter(|w| {
            w.trainable()
                || !["/mean", "/variance", "/count"]
                    .iter()
                    .any(|s| w.name.ends_with(s))
        })
        .map(|w| w.name.as_str())
        .collect();
    if !missing.is_empty() || !extra.is_empty() {
        return Err(format!(
            "weights Keras has and kiln lacks: {missing:?}; kiln has and Keras lacks: {extra:?}"
        ));
    }
    let (x, y) = (inputs(&train["x"]), inputs(&train["y"]));
    let n = x[0].dims()[0];
    let data = Dataset::multi(x, y).map_err(|e| format!("data: {e}"))?;
    let history = model
        .fit(
            &data,
            Fit::new().epochs(1).batch_size(n).shuffle(false).quiet(),
        )
        .map_err(|e| format!("fit: {e}"))?;
    let loss = history.last().unwrap().get("loss").unwrap();
    let keras_loss = train["loss"].as_f64().unwrap();
    if (loss - keras_loss).abs() > 1e-4 * keras_loss.abs().max(1.0) {
        return Err(format!("loss: Keras {keras_loss}, kiln {loss}"));
    }
    // Every weight that differs, with its largest difference.
    let mut wrong = Vec::new();
    for (name, w) in want {
        let got = values(
            model
                .weight(name)
                .map_err(|e| e.to_string())?
                .var
                .as_tensor(),
        );
        let mut wv = Vec::new();
        flat(w, &mut wv);
        let worst = wv
            .iter()
            .zip(&got)
            .enumerate()
            .map(|(i, (w, g))| (i, *w, *g, (w - g).abs() / (2e-4 * w.abs().max(1.0) + 1e-6)))
            .max_by(|a, b| a.3.total_cmp(&b.3));
        if let Some((i, w, g, over)) = worst.filter(|x| x.3 > 1.0) {
            wrong.push(format!(
                "{name}[{i}] Keras {w}, kiln {g} ({over:.1}x the tolerance)"
            ));
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(format!("after one step: {}", wrong.join("; ")))
    }
}

/// `save_keras` then `from_keras` gives the same weights and predictions, bit for bit.
fn round_trips(file: &str, c: &Value, dir: &Path) -> Outcome {
    let model = import(file)?;
    let out = dir.join(file);
    model
        .save_keras(&out)
        .map_err(|e| format!("save_keras: {e}"))?;
    let back = Model::from_keras(&out).map_err(|e| format!("re-import: {e}"))?;
    for w in model.weights() {
        let b = back
            .weight(&w.name)
            .map_err(|e| format!("re-import: {e}"))?;
        if values(w.var.as_tensor()) != values(b.var.as_tensor()) {
            return Err(format!("re-imported {} differs", w.name));
        }
    }
    let x = inputs(&c["inputs"]);
    let (a, b) = (
        model.predict(&x, 64).map_err(|e| e.to_string())?,
        back.predict(&x, 64).map_err(|e| e.to_string())?,
    );
    if a.iter().map(values).ne(b.iter().map(values)) {
        return Err("re-imported predictions differ".into());
    }
    Ok(())
}

/// Runs `check` on `file`, a failure or a panic as a message naming the file.
fn run(file: &str, what: &str, check: impl FnOnce() -> Outcome) -> Option<String> {
    match catch_unwind(AssertUnwindSafe(check)) {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("{file}: {what}: {e}")),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Some(format!("{file}: {what}: {msg}"))
        }
    }
}

fn every_model(what: &str, check: impl Fn(&str, &Value) -> Outcome) {
    let all = cases();
    assert!(all.len() >= 30, "only {} random models", all.len());
    let failures: Vec<String> = all
        .iter()
        .filter_map(|(file, c)| run(file, what, || check(file, c)))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} random models fail:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n")
    );
}

#[test]
fn random_models_predict_as_keras_does() {
    every_model("predict", predicts);
}

#[test]
fn random_models_take_keras_training_step() {
    every_model("train", trains);
}

#[test]
fn random_models_export_and_reimport_unchanged() {
    let dir = super::support::temp("keras-random", "export");
    every_model("export", |file, c| round_trips(file, c, &dir));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The first layer of `class` at the top of a random model's config, and its index.
fn first_layer(file: &str, class: &str) -> usize {
    let mut zip = zip::ZipArchive::new(std::fs::File::open(folder().join(file)).unwrap()).unwrap();
    let config: Value = serde_json::from_reader(zip.by_name("config.json").unwrap()).unwrap();
    config["config"]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .position(|l| l["class_name"] == class)
        .unwrap_or_else(|| panic!("{file} has no {class} at the top"))
}

/// The refusal of `file` with `key` of its first `class` layer set to `value`: the message,
/// which must name the option's place in the config.
fn refused_option(file: &str, class: &str, key: &str, value: Value) -> String {
    let i = first_layer(file, class);
    let tag = format!("random-{key}");
    let path = super::keras_files::edited(&format!("random/{file}"), &tag, |v| {
        v["config"]["layers"][i]["config"][key] = value.clone();
    });
    let result = Model::from_keras(&path);
    std::fs::remove_file(&path).unwrap();
    let msg = match result {
        Ok(_) => panic!("{file}: {class} with {key} = {value} was imported"),
        Err(e) => e.to_string(),
    };
    let place = format!("config.layers[{i}].config.{key}");
    assert!(
        msg.contains(&place) && msg.contains(&tag),
        "{file}: {key}: the message names not {place} and the file: {msg}"
    );
    msg
}

/// What the generator leaves out because kiln lacks it is refused, naming the option and its
/// place in the config, never approximated.
#[test]
fn options_kiln_lacks_are_refused_by_name_and_place() {
    let msg = refused_option(
        "rand_08.keras",
        "LayerNormalization",
        "rms_scaling",
        true.into(),
    );
    assert!(msg.contains("rms_scaling = false"), "{msg}");
    let msg = refused_option("rand_00.keras", "BatchNormalization", "renorm", true.into());
    assert!(msg.contains("renorm = false"), "{msg}");
    // Keras' four constraints are imported (keras_schedules.rs); a class kiln lacks, or an
    // option a constraint does not have, is refused by name.
    let radial = serde_json::json!({
        "module": "keras.constraints", "class_name": "RadialConstraint",
        "config": {}, "registered_name": null
    });
    let msg = refused_option("rand_00.keras", "Dense", "kernel_constraint", radial);
    assert!(
        msg.contains("kiln has no constraint `RadialConstraint`"),
        "{msg}"
    );
    let max_norm = serde_json::json!({
        "module": "keras.constraints", "class_name": "MaxNorm",
        "config": {"max_value": 2.0, "axes": 0}, "registered_name": null
    });
    let msg = refused_option("rand_00.keras", "Dense", "kernel_constraint", max_norm);
    assert!(msg.contains("unknown option `axes`"), "{msg}");
    let msg = refused_option(
        "rand_04.keras",
        "Conv1D",
        "data_format",
        "channels_middle".into(),
    );
    assert!(
        msg.contains("use \"channels_last\" or \"channels_first\""),
        "{msg}"
    );
    let msg = refused_option("rand_08.keras", "LSTM", "stateful", true.into());
    assert!(msg.contains("stateful = false"), "{msg}");
    let msg = refused_option("rand_00.keras", "Dense", "activation", "sparsemax".into());
    assert!(msg.contains("kiln has no activation `sparsemax`"), "{msg}");
    // An optimizer kiln lacks is named in compile_config.
    let path = super::keras_files::edited("random/rand_00.keras", "random-ftrl", |v| {
        v["compile_config"]["optimizer"]["class_name"] = "Ftrl".into();
    });
    let result = Model::from_keras(&path);
    std::fs::remove_file(&path).unwrap();
    let Err(e) = result else {
        panic!("Ftrl was imported")
    };
    let msg = e.to_string();
    assert!(
        msg.contains("compile_config.optimizer") && msg.contains("`Ftrl`"),
        "{msg}"
    );
}
