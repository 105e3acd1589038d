//! Keras `.keras` files: import, predict, one training step and export against real Keras 3.15.1
//! (tests/fixtures/keras/*.keras and *.json, written by make_keras_models.py), and the
//! refusals of hostile files.

use candle_core::{Device, Tensor};
use kiln::prelude::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/keras/{name}"))
}

/// Every compiled fixture (a Keras 3 `.keras` file, or a legacy `.h5` whole-model file written
/// by Keras 2 or Keras 3, make_keras_legacy.py) and the relative tolerance of its predictions.
const MODELS: [(&str, f64); 25] = [
    ("mlp_sequential.keras", 1e-5),
    ("functional_two_heads.keras", 1e-5),
    ("nested_shared.keras", 1e-5),
    ("cnn2d.keras", 1e-4),
    ("conv1d.keras", 1e-4),
    ("recurrent.keras", 1e-4),
    ("shapes.keras", 1e-5),
    ("sequential_nested.keras", 1e-4),
    ("recurrent_backwards.keras", 1e-4),
    ("nested_frozen.keras", 1e-5),
    ("explicit_masks.keras", 1e-4),
    ("nested_mask.keras", 1e-4),
    ("norm_axes.keras", 1e-4),
    ("conv_groups.keras", 1e-4),
    ("recurrent_dropout.keras", 1e-4),
    ("recurrent_state_dropout.keras", 1e-4),
    ("recurrent_states.keras", 1e-4),
    ("recurrent_states_gru.keras", 1e-4),
    ("recurrent_activations.keras", 1e-4),
    ("noop_masks.keras", 1e-4),
    ("pool_ties.keras", 1e-4),
    ("channels_first.keras", 1e-4),
    ("legacy2_sequential.h5", 1e-4),
    ("legacy2_functional.h5", 1e-4),
    ("legacy3_functional.h5", 1e-4),
];

/// A fixture model as `Model::from_keras` reads it, and its case (the JSON beside it).
fn imported(file: &str) -> (Model, Value) {
    let model = Model::from_keras(fixture(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    (model, case(stem(file)))
}

fn stem(file: &str) -> &str {
    file.rsplit_once('.').map_or(file, |(s, _)| s)
}

fn case(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(&format!("{name}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub(super) fn flat(v: &Value, out: &mut Vec<f64>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flat(x, out)),
        x => out.push(x.as_f64().unwrap()),
    }
}

pub(super) fn shape(v: &Value) -> Vec<usize> {
    let mut s = Vec::new();
    let mut v = v;
    while let Value::Array(a) = v {
        s.push(a.len());
        v = &a[0];
    }
    s
}

pub(super) fn tensor(v: &Value) -> Tensor {
    let mut values = Vec::new();
    flat(v, &mut values);
    let values: Vec<f32> = values.into_iter().map(|x| x as f32).collect();
    Tensor::from_vec(values, shape(v), &Device::Cpu).unwrap()
}

pub(super) fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

pub(super) fn assert_close(what: &str, want: &[f64], got: &[f64], rtol: f64) {
    assert_eq!(want.len(), got.len(), "{what}: sizes differ");
    for (i, (w, g)) in want.iter().zip(got).enumerate() {
        let tol = rtol * w.abs().max(1.0) + 1e-6;
        assert!(
            (w - g).abs() <= tol,
            "{what}[{i}]: Keras {w}, kiln {g} (tolerance {tol})"
        );
    }
}

fn predictions(model: &Model, c: &Value) -> Vec<Tensor> {
    let inputs: Vec<Tensor> = c["inputs"].as_array().unwrap().iter().map(tensor).collect();
    model.predict(&inputs, 64).unwrap()
}

#[test]
fn imported_models_predict_as_keras_does() {
    for (name, rtol) in MODELS {
        let (model, c) = imported(name);
        let got = predictions(&model, &c);
        let want = c["predictions"].as_array().unwrap();
        assert_eq!(got.len(), want.len(), "{name}: outputs");
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            assert_eq!(g.dims(), shape(w).as_slice(), "{name} output {i}");
            let mut wv = Vec::new();
            flat(w, &mut wv);
            assert_close(&format!("{name} output {i}"), &wv, &values(g), rtol);
        }
    }
}

#[test]
fn weights_keep_keras_layer_paths() {
    let model = Model::from_keras(fixture("nested_shared.keras")).unwrap();
    let mut names: Vec<String> = model.weights().into_iter().map(|w| w.name).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "encoder/dense/bias",
            "encoder/dense/kernel",
            "score/bias",
            "score/kernel",
            "shared/bias",
            "shared/kernel"
        ]
    );
    let model = Model::from_keras(fixture("recurrent.keras")).unwrap();
    assert!(model.weight("lstm/recurrent_kernel").is_ok());
    assert_eq!(model.weight("gru/bias").unwrap().var.dims(), &[2, 9]);
}

/// An imported nested model is a kiln model applied as a layer, as one built in Rust: its
/// weights come in Keras' `model.weights` order (the nested model's at its place among the
/// layers: `shared`, `encoder`, `score` for this file, as Keras 3.15 lists them), the summary
/// shows it as one row with its 18 parameters (Keras' `count_params`), and it freezes by name.
#[test]
fn an_imported_nested_model_is_a_nested_kiln_model() {
    let mut model = Model::from_keras(fixture("nested_shared.keras")).unwrap();
    let names: Vec<String> = model.weights().into_iter().map(|w| w.name).collect();
    assert_eq!(
        names,
        [
            "shared/kernel",
            "shared/bias",
            "encoder/dense/kernel",
            "encoder/dense/bias",
            "score/kernel",
            "score/bias"
        ]
    );
    let table = model.summary();
    let row = table.lines().find(|l| l.contains("encoder (")).unwrap();
    assert!(
        row.contains("encoder (Functional)") && row.contains(" 18 "),
        "{table}"
    );
    assert!(table.contains("Total params: 55 "), "{table}");
    model.set_trainable("encoder", false).unwrap();
    let frozen: Vec<String> = model
        .non_trainable_weights()
        .into_iter()
        .map(|w| w.name)
        .collect();
    assert_eq!(frozen, ["encoder/dense/kernel", "encoder/dense/bias"]);
}

/// One `train_on_batch` in Keras and one fit step of the whole batch in kiln, from the same
/// weights with the carried-over loss and optimizer, give the same weights.
#[test]
fn one_training_step_matches_keras() {
    for (name, _) in MODELS {
        let (mut model, c) = imported(name);
        let Some(train) = c.get("train") else {
            continue;
        };
        let x: Vec<Tensor> = train["x"].as_array().unwrap().iter().map(tensor).collect();
        let y: Vec<Tensor> = train["y"].as_array().unwrap().iter().map(tensor).collect();
        let n = x[0].dims()[0];
        let data = Dataset::multi(x, y).unwrap();
        let history = model
            .fit(
                &data,
                Fit::new().epochs(1).batch_size(n).shuffle(false).quiet(),
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let loss = history.last().unwrap().get("loss").unwrap();
        let keras_loss = train["loss"].as_f64().unwrap();
        assert!(
            (loss - keras_loss).abs() <= 1e-4 * keras_loss.abs().max(1.0),
            "{name}: loss Keras {keras_loss}, kiln {loss}"
        );
        for (wname, want) in train["weights_after"].as_object().unwrap() {
            let w = model
                .weight(wname)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let mut wv = Vec::new();
            flat(want, &mut wv);
            assert_close(
                &format!("{name} {wname}"),
                &wv,
                &values(w.var.as_tensor()),
                2e-4,
            );
        }
    }
}

#[test]
fn export_then_import_gives_the_same_weights_and_predictions() {
    let dir = std::env::temp_dir().join(format!("kiln-keras-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, _) in MODELS {
        let (model, c) = imported(name);
        let out = dir.join(format!("{}.keras", stem(name)));
        model.save_keras(&out).unwrap();
        let back = Model::from_keras(&out).unwrap_or_else(|e| panic!("{name}: {e}"));
        for w in model.weights() {
            let b = back.weight(&w.name).unwrap();
            assert_eq!(
                values(w.var.as_tensor()),
                values(b.var.as_tensor()),
                "{name} {}",
                w.name
            );
        }
        for (a, b) in predictions(&model, &c).iter().zip(predictions(&back, &c)) {
            assert_eq!(values(a), values(&b), "{name}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A model built in kiln (Dense, Dropout, Activation, an L2 penalty) written as Keras and read
/// back: the same weights and predictions.
#[test]
fn a_kiln_built_model_exports_and_imports_unchanged() {
    let x = Input::named("features", [5]);
    let h = Dense::new(4)
        .activation(Activation::Tanh)
        .kernel_regularizer(L2::new(1e-3))
        .with_name("hidden")
        .apply(&x)
        .unwrap();
    let h = Dropout::new(0.2).apply(&h).unwrap();
    let h = ActivationLayer::new(Activation::Relu).apply(&h).unwrap();
    let y = Dense::new(2)
        .use_bias(false)
        .with_name("out")
        .apply(&h)
        .unwrap();
    let model = Model::builder(&[x], &[y]).seed(3).build().unwrap();
    let path = std::env::temp_dir().join(format!("kiln-native-{}.keras", std::process::id()));
    model.save_keras(&path).unwrap();
    let back = Model::from_keras(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    for w in model.weights() {
        assert_eq!(
            values(w.var.as_tensor()),
            values(back.weight(&w.name).unwrap().var.as_tensor()),
            "{}",
            w.name
        );
    }
    let input = Tensor::arange(0f32, 15.0, &Device::Cpu)
        .unwrap()
        .reshape((3, 5))
        .unwrap();
    let (a, b) = (
        model.predict(std::slice::from_ref(&input), 8).unwrap(),
        back.predict(&[input], 8).unwrap(),
    );
    assert_eq!(values(&a[0]), values(&b[0]));
}

fn refusal(name: &str) -> String {
    match Model::from_keras(fixture(name)) {
        Ok(_) => panic!("{name} was imported"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn links_out_of_the_weights_file_are_not_followed() {
    for name in ["hostile_soft_link.keras", "hostile_external_link.keras"] {
        let msg = refusal(name);
        assert!(
            msg.contains("/layers/dense/vars")
                && msg.contains("never follows soft or external links"),
            "{name}: {msg}"
        );
    }
}

/// A legacy `.h5` file goes through the same hard-link-only reader: a weight behind a soft or
/// an external link is refused, naming it.
#[test]
fn links_out_of_a_legacy_h5_file_are_not_followed() {
    for name in [
        "hostile_legacy_soft_link.h5",
        "hostile_legacy_external_link.h5",
    ] {
        let msg = refusal(name);
        assert!(
            msg.contains("/model_weights/hidden/hidden")
                && msg.contains("never follows soft or external links"),
            "{name}: {msg}"
        );
    }
}

/// Legacy files are told by their content: a Keras 2 `.h5` file under another name reads the
/// same, and an HDF5 file without `model_config` (weights only) is refused saying so.
#[test]
fn legacy_h5_files_are_read_by_content() {
    let dir = std::env::temp_dir().join(format!("kiln-legacy-name-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let renamed = dir.join("model.keras");
    std::fs::copy(fixture("legacy2_sequential.h5"), &renamed).unwrap();
    let model = Model::from_keras(&renamed).unwrap();
    let c = case("legacy2_sequential");
    let mut want = Vec::new();
    flat(&c["predictions"][0], &mut want);
    assert_close("renamed", &want, &values(&predictions(&model, &c)[0]), 1e-4);
    assert_eq!(model.weight("bn/moving_variance").unwrap().var.dims(), &[8]);
    // A compile error names training_config, where the file holds it.
    let msg = refusal("hostile_legacy_bad_loss.h5");
    assert!(
        msg.contains("hostile_legacy_bad_loss.h5: training_config: loss")
            && msg.contains("`fancy_loss`"),
        "{msg}"
    );
    let msg = refusal("../keras_normalization.json");
    assert!(msg.contains("neither a .keras file"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_dataset_whose_data_the_file_does_not_hold_is_refused() {
    let msg = refusal("hostile_unallocated.keras");
    assert!(
        msg.contains("/layers/dense/vars/0")
            && msg.contains("does not hold: refused before allocating"),
        "{msg}"
    );
}

#[test]
fn lambda_layers_are_refused() {
    let msg = refusal("hostile_lambda.keras");
    assert!(
        msg.contains("config.layers[1].class_name")
            && msg.contains("Lambda")
            && msg.contains("never runs code"),
        "{msg}"
    );
}

/// Rewrites a fixture's config.json through `edit`, into a temporary `.keras` file.
pub(super) fn edited(name: &str, tag: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let mut edit = Some(edit);
    use std::io::{Read, Write};
    let mut zip = zip::ZipArchive::new(std::fs::File::open(fixture(name)).unwrap()).unwrap();
    let mut parts: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..zip.len() {
        let mut f = zip.by_index(i).unwrap();
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).unwrap();
        parts.push((f.name().unwrap().to_string(), bytes));
    }
    for (n, bytes) in &mut parts {
        if n == "config.json" {
            let mut v: Value = serde_json::from_slice(bytes).unwrap();
            (edit.take().expect("one config.json"))(&mut v);
            *bytes = serde_json::to_vec(&v).unwrap();
        }
    }
    let path = std::env::temp_dir().join(format!("kiln-keras-{tag}-{}.keras", std::process::id()));
    let mut w = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    for (n, bytes) in parts {
        w.start_file(n, zip::write::SimpleFileOptions::default())
            .unwrap();
        w.write_all(&bytes).unwrap();
    }
    w.finish().unwrap();
    path
}

fn refused_edit(tag: &str, edit: impl FnOnce(&mut Value)) -> String {
    let path = edited("cnn2d.keras", tag, edit);
    let msg = match Model::from_keras(&path) {
        Ok(_) => panic!("{tag}: imported"),
        Err(e) => e.to_string(),
    };
    std::fs::remove_file(&path).unwrap();
    msg
}

/// What kiln cannot read of a file with recurrent states is an error naming its place: a
/// stateful LSTM, initial_state given to a layer that is not recurrent or with one state too
/// few, and a state read by an output index the layer does not have.
#[test]
fn recurrent_states_kiln_cannot_read_are_errors_naming_their_place() {
    let refused = |tag: &str, edit: &dyn Fn(&mut Value)| -> String {
        let path = edited("recurrent_states.keras", tag, edit);
        let msg = match Model::from_keras(&path) {
            Ok(_) => panic!("{tag}: imported"),
            Err(e) => e.to_string(),
        };
        std::fs::remove_file(&path).unwrap();
        msg
    };
    let msg = refused("stateful", &|v| {
        v["config"]["layers"][4]["config"]["stateful"] = true.into();
    });
    assert!(
        msg.contains("config.layers[4].config.stateful") && msg.contains("stateful = false"),
        "{msg}"
    );
    let msg = refused("dense_initial", &|v| {
        let states = v["config"]["layers"][5]["inbound_nodes"][0]["kwargs"].clone();
        v["config"]["layers"][9]["inbound_nodes"][0]["kwargs"] = states;
    });
    assert!(
        msg.contains("config.layers[9].inbound_nodes[0].kwargs.initial_state")
            && msg.contains("layer `score` is given initial_state"),
        "{msg}"
    );
    let msg = refused("one_state", &|v| {
        let kwargs = &mut v["config"]["layers"][5]["inbound_nodes"][0]["kwargs"];
        kwargs["initial_state"].as_array_mut().unwrap().pop();
    });
    assert!(
        msg.contains("layer `decoder`") && msg.contains("2 tensor(s) [h, c]"),
        "{msg}"
    );
    let msg = refused("bad_index", &|v| {
        let kwargs = &mut v["config"]["layers"][5]["inbound_nodes"][0]["kwargs"];
        kwargs["initial_state"][1]["config"]["keras_history"][2] = 3.into();
    });
    assert!(
        msg.contains("layer `decoder` takes a tensor that no layer"),
        "{msg}"
    );
}

#[test]
fn unknown_layers_options_activations_and_losses_are_errors_naming_their_place() {
    let msg = refused_edit("option", |v| {
        v["config"]["layers"][1]["config"]["data_format"] = "channels_middle".into();
    });
    assert!(
        msg.contains("config.layers[1].config.data_format")
            && msg.contains("\"channels_middle\" is not a data format"),
        "{msg}"
    );
    // A rate that is not a number.
    let path = edited("recurrent_dropout.keras", "rec_dropout", |v| {
        v["config"]["layers"][1]["config"]["recurrent_dropout"] = "0.2".into();
    });
    let Err(e) = Model::from_keras(&path) else {
        panic!("recurrent_dropout was imported")
    };
    let msg = e.to_string();
    std::fs::remove_file(&path).unwrap();
    assert!(
        msg.contains("config.layers[1].config.recurrent_dropout"),
        "{msg}"
    );
    // Groups that do not divide the channels: Keras refuses them too.
    let msg = refused_edit("groups", |v| {
        v["config"]["layers"][1]["config"]["groups"] = 3.into();
    });
    assert!(msg.contains("groups = 3 must divide"), "{msg}");
    let msg = refused_edit("unknown", |v| {
        v["config"]["layers"][2]["config"]["new_option"] = true.into();
    });
    assert!(
        msg.contains("config.layers[2].config.new_option") && msg.contains("unknown option"),
        "{msg}"
    );
    let msg = refused_edit("activation", |v| {
        v["config"]["layers"][1]["config"]["activation"] = "glu".into();
    });
    assert!(
        msg.contains("config.layers[1].config.activation") && msg.contains("`glu`"),
        "{msg}"
    );
    let msg = refused_edit("class", |v| {
        v["config"]["layers"][3]["class_name"] = "SeparableConv2D".into();
    });
    assert!(
        msg.contains("config.layers[3].class_name") && msg.contains("SeparableConv2D"),
        "{msg}"
    );
    let msg = refused_edit("axes", |v| {
        v["config"]["layers"][3]["config"]["axis"] = serde_json::json!([1, 2]);
    });
    assert!(
        msg.contains("config.layers[3].config.axis") && msg.contains("one integer"),
        "{msg}"
    );
    let msg = refused_edit("batch_axis", |v| {
        v["config"]["layers"][3]["config"]["axis"] = 0.into();
    });
    assert!(
        msg.contains("layer `bn`") && msg.contains("axis 0 is not a feature axis"),
        "{msg}"
    );
    let msg = refused_edit("loss", |v| {
        v["compile_config"]["loss"]["class_name"] = "MyLoss".into();
        v["compile_config"]["loss"]["registered_name"] = "Custom>MyLoss".into();
    });
    assert!(
        msg.contains("compile_config.loss") && msg.contains("`Custom>MyLoss` is not registered"),
        "{msg}"
    );
    let msg = refused_edit("loss_param", |v| {
        v["compile_config"]["loss"]["config"]["from_logits"] = "yes".into();
    });
    assert!(
        msg.contains("compile_config.loss.config") && msg.contains("from_logits"),
        "{msg}"
    );
}

#[test]
fn a_registered_custom_loss_is_found_by_its_keras_name() {
    kiln::losses::register(
        "Custom>keras_test_mse",
        loss_fn("keras_test_mse", |t: &Tensor, p: &Tensor| {
            Ok((p - t)?.sqr()?.mean(candle_core::D::Minus1)?)
        }),
    );
    let path = edited("conv1d.keras", "custom", |v| {
        v["compile_config"]["loss"] = serde_json::json!({
            "module": null, "class_name": "keras_test_mse",
            "config": {"name": "keras_test_mse"}, "registered_name": "Custom>keras_test_mse"
        });
    });
    let model = Model::from_keras(&path).unwrap();
    assert!(model.is_compiled());
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_zip_bomb_is_refused_before_decompressing() {
    use std::io::Write;
    let path = std::env::temp_dir().join(format!("kiln-keras-bomb-{}.keras", std::process::id()));
    let mut w = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let deflated = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(true);
    w.start_file("config.json", zip::write::SimpleFileOptions::default())
        .unwrap();
    w.write_all(b"{}").unwrap();
    w.start_file("model.weights.h5", deflated).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..200 {
        w.write_all(&zeros).unwrap();
    }
    w.finish().unwrap();
    let msg = match Model::from_keras(&path) {
        Ok(_) => panic!("imported a bomb"),
        Err(e) => e.to_string(),
    };
    std::fs::remove_file(&path).unwrap();
    assert!(
        msg.contains("model.weights.h5") && msg.contains("decompression bomb"),
        "{msg}"
    );
}

fn kiln(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `kiln import FILE --out DIR/run` (a compiled one-input fixture), checking the run folder it
/// writes (the model file under `copy`), then `kiln predict` of the folder on the fixture's
/// inputs against Keras' predictions; returns the run folder.
fn import_and_predict(file: &str, copy: &str, dir: &Path, rtol: f64) -> PathBuf {
    let run = dir.join("run");
    let source = fixture(file);
    let (ok, text) = kiln(&[
        "import",
        source.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(ok && text.contains("compiled"), "{text}");
    for f in [copy, "model.json", "model.safetensors"] {
        assert!(run.join(f).is_file(), "{f}");
    }
    let c = case(stem(file));
    let x = tensor(&c["inputs"][0]);
    let (xin, pout) = (dir.join("x.npy"), dir.join("p.npy"));
    x.write_npy(&xin).unwrap();
    let (ok, text) = kiln(&[
        "predict",
        run.to_str().unwrap(),
        "--input",
        xin.to_str().unwrap(),
        "--output",
        pout.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let p = Tensor::read_npy(&pout).unwrap();
    let mut want = Vec::new();
    flat(&c["predictions"][0], &mut want);
    assert_close("kiln predict", &want, &values(&p), rtol);
    run
}

/// A legacy `.h5` file imports into a run folder that keeps it as `model.h5`.
#[test]
fn kiln_import_takes_a_legacy_h5_file() {
    let dir = std::env::temp_dir().join(format!("kiln-legacy-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = import_and_predict("legacy2_sequential.h5", "model.h5", &dir, 1e-4);
    let json = std::fs::read_to_string(run.join("model.json")).unwrap();
    assert!(json.contains("model.h5"), "{json}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn kiln_import_writes_a_run_folder_that_predict_and_export_take() {
    let dir = std::env::temp_dir().join(format!("kiln-keras-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = import_and_predict("mlp_sequential.keras", "model.keras", &dir, 1e-5);
    let source = fixture("mlp_sequential.keras");

    let out = dir.join("back.keras");
    let (ok, text) = kiln(&[
        "export",
        run.to_str().unwrap(),
        "--keras",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let (a, b) = (
        Model::from_keras(&source).unwrap(),
        Model::from_keras(&out).unwrap(),
    );
    for w in a.weights() {
        let v = b.weight(&w.name).unwrap();
        assert_eq!(
            values(w.var.as_tensor()),
            values(v.var.as_tensor()),
            "{}",
            w.name
        );
    }
    let (ok, text) = kiln(&[
        "import",
        fixture("hostile_lambda.keras").to_str().unwrap(),
        "--out",
        dir.join("bad").to_str().unwrap(),
    ]);
    assert!(!ok && text.contains("Lambda"), "{text}");
    assert!(!dir.join("bad").join("model.json").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

mod mutated {
    use super::*;
    use proptest::prelude::*;

    fn any_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            (-5i64..100).prop_map(Value::from),
            (-1e3f64..1e3).prop_map(Value::from),
            "[a-z_]{0,12}".prop_map(Value::from),
            prop::collection::vec(-2i64..5, 0..4).prop_map(Value::from),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        /// Any value written over any option of any layer of a real config is either imported
        /// or refused with a message naming config.json: never a panic.
        #[test]
        fn a_mutated_config_is_imported_or_refused_naming_the_config(
            layer in 0usize..16,
            key in 0usize..32,
            value in any_value(),
        ) {
            let path = edited("functional_two_heads.keras", &format!("mutated-{layer}-{key}"), |v| {
                let layers = v["config"]["layers"].as_array_mut().unwrap();
                let n = layers.len();
                let cfg = layers[layer % n]["config"].as_object_mut().unwrap();
                let keys: Vec<String> = cfg.keys().cloned().collect();
                let k = keys[key % keys.len()].clone();
                cfg.insert(k, value.clone());
            });
            let result = Model::from_keras(&path);
            std::fs::remove_file(&path).unwrap();
            if let Err(e) = result {
                let msg = e.to_string();
                prop_assert!(msg.contains("config.json"), "{}", msg);
            }
        }
    }
}

mod flipped {
    use super::*;
    use proptest::prelude::*;

    /// Rewrites a fixture's weights member with `edit` into a temporary `.keras` file.
    fn with_weights(tag: &str, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
        use std::io::{Read, Write};
        let mut zip =
            zip::ZipArchive::new(std::fs::File::open(fixture("mlp_sequential.keras")).unwrap())
                .unwrap();
        let mut parts: Vec<(String, Vec<u8>)> = Vec::new();
        for i in 0..zip.len() {
            let mut f = zip.by_index(i).unwrap();
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes).unwrap();
            parts.push((f.name().unwrap().to_string(), bytes));
        }
        let mut edit = Some(edit);
        for (n, bytes) in &mut parts {
            if n == "model.weights.h5" {
                (edit.take().unwrap())(bytes);
            }
        }
        let path =
            std::env::temp_dir().join(format!("kiln-keras-{tag}-{}.keras", std::process::id()));
        let mut w = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        for (n, bytes) in parts {
            w.start_file(n, zip::write::SimpleFileOptions::default())
                .unwrap();
            w.write_all(&bytes).unwrap();
        }
        w.finish().unwrap();
        path
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        /// A damaged weights file (bytes overwritten, or cut short) gives weights or an error
        /// naming model.weights.h5: never a panic.
        #[test]
        fn a_damaged_weights_file_is_read_or_refused(
            at in 0usize..16_000,
            byte in any::<u8>(),
            cut in proptest::option::of(0usize..16_000),
        ) {
            let path = with_weights("flipped", |bytes| {
                let n = bytes.len();
                bytes[at % n] = byte;
                if let Some(c) = cut {
                    bytes.truncate(c % n);
                }
            });
            let result = std::panic::catch_unwind(|| Model::from_keras(&path).map(|_| ()));
            std::fs::remove_file(&path).unwrap();
            match result {
                Err(_) => prop_assert!(false, "a panic at byte {at} = {byte}, cut {cut:?}"),
                Ok(Err(e)) => {
                    let msg = e.to_string();
                    prop_assert!(msg.contains("model.weights.h5"), "{}", msg);
                }
                Ok(Ok(())) => {}
            }
        }
    }
}

/// A layer Keras saved frozen (`trainable: false`) is imported frozen: it is not among the
/// trainable weights and a training step leaves it bit-identical, while the others move.
#[test]
fn frozen_layers_import_frozen() {
    let path = edited("cnn2d.keras", "frozen", |v| {
        v["config"]["layers"][1]["config"]["trainable"] = false.into();
    });
    let mut model = Model::from_keras(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(!model.is_trainable("c1").unwrap());
    let frozen: Vec<String> = model
        .weights()
        .iter()
        .filter(|w| !w.trainable())
        .map(|w| w.name.clone())
        .collect();
    assert!(frozen.iter().any(|n| n.starts_with("c1/")), "{frozen:?}");
    let before: Vec<(String, Vec<f32>)> = model
        .weights()
        .iter()
        .map(|w| {
            (
                w.name.clone(),
                w.var.flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect();
    let c = case("cnn2d");
    let train = &c["train"];
    let x: Vec<Tensor> = train["x"].as_array().unwrap().iter().map(tensor).collect();
    let y: Vec<Tensor> = train["y"].as_array().unwrap().iter().map(tensor).collect();
    let n = x[0].dims()[0];
    let data = Dataset::multi(x, y).unwrap();
    model
        .fit(
            &data,
            Fit::new().epochs(1).batch_size(n).shuffle(false).quiet(),
        )
        .unwrap();
    for (name, old) in before {
        let now: Vec<f32> = model
            .weight(&name)
            .unwrap()
            .var
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(name.starts_with("c1/"), now == old, "{name}");
    }
}

/// A nested model saved with `trainable: false` as a whole is imported frozen, whatever its
/// layers say: the model-level flag alone freezes them (Keras' `model.trainable = False`).
#[test]
fn a_nested_model_frozen_as_a_whole_imports_frozen() {
    let path = edited("nested_frozen.keras", "whole", |v| {
        let body = &mut v["config"]["layers"][1]["config"];
        assert_eq!(body["name"], "body");
        for l in body["layers"].as_array_mut().unwrap() {
            if l["class_name"] == "Dense" {
                l["config"]["trainable"] = true.into();
            }
        }
    });
    let model = Model::from_keras(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    for w in model.weights() {
        assert_eq!(w.trainable(), w.name.starts_with("head/"), "{}", w.name);
    }
    assert!(!model.is_trainable("body/d1").unwrap());
}

/// A weight that config.json describes but the weights file lacks is refused before any model
/// is built, naming the layer and the weight.
#[test]
fn a_weight_missing_from_the_file_is_named_before_building() {
    let path = edited("cnn2d.keras", "missing", |v| {
        let c2 = &mut v["config"]["layers"][2]["config"];
        assert_eq!(c2["name"], "c2");
        c2["use_bias"] = true.into();
    });
    let err = Model::from_keras(&path).unwrap_err().to_string();
    std::fs::remove_file(&path).unwrap();
    assert!(
        err.contains("/layers/conv2d_1/vars/1")
            && err.contains("weight `c2/bias` of layer `c2` is not stored"),
        "{err}"
    );
}

/// `kiln import`, then `kiln train` on the imported folder with a run file, `--resume`,
/// `evaluate` and `predict` on it: the folder keeps its Keras architecture (model.keras) and
/// model.json names it, a run stopped after 2 epochs and resumed to 3 ends with the same
/// weights, byte for byte, as 3 epochs at once, and evaluate and predict give what the library
/// gives for the folder's model and weights.
#[test]
fn an_imported_folder_trains_resumes_evaluates_and_predicts() {
    let dir = std::env::temp_dir().join(format!("kiln-keras-cli-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut csv = String::from("x0,x1,x2,x3,x4,x5,label\n");
    for r in 0..24 {
        let row: Vec<String> = (0..6)
            .map(|c| format!("{:.3}", ((r * 7 + c * 3) % 11) as f64 / 5.0 - 1.0))
            .collect();
        csv.push_str(&format!("{},{}\n", row.join(","), r % 4));
    }
    std::fs::write(dir.join("d.csv"), csv).unwrap();
    let source = fixture("mlp_sequential.keras");
    let train_in = |folder: &str, epochs: &str| {
        let run = dir.join(folder);
        let (ok, text) = kiln(&[
            "import",
            source.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
        ]);
        assert!(ok, "{text}");
        let toml = format!(
            "[data]\nsource = \"csv\"\npath = \"d.csv\"\nlabel_columns = [\"label\"]\none_hot = 4\n\
             [model]\nkeras = \"{folder}/model.keras\"\n[compile]\nkeras = true\n\
             [fit]\nepochs = 3\nbatch_size = 8\nshuffle = false\n"
        );
        let file = dir.join(format!("{folder}.toml"));
        std::fs::write(&file, toml).unwrap();
        let (ok, text) = kiln(&[
            "train",
            file.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
            "--epochs",
            epochs,
            "--quiet",
        ]);
        assert!(ok, "{text}");
        run
    };
    let whole = train_in("whole", "3");
    let part = train_in("part", "2");
    let (ok, text) = kiln(&[
        "train",
        "--resume",
        part.to_str().unwrap(),
        "--epochs",
        "3",
        "--quiet",
    ]);
    assert!(ok && text.contains("resumed"), "{text}");
    assert_eq!(
        std::fs::read(whole.join("model.safetensors")).unwrap(),
        std::fs::read(part.join("model.safetensors")).unwrap(),
        "2 epochs then --resume to 3 give the weights of 3 epochs at once"
    );
    let json: Value =
        serde_json::from_slice(&std::fs::read(part.join("model.json")).unwrap()).unwrap();
    assert_eq!(json["model"]["keras"], "model.keras", "{json}");
    // The library's view of the folder: its Keras architecture and trained weights.
    let model = Model::from_keras(part.join("model.keras")).unwrap();
    model.load_weights(part.join("model.safetensors")).unwrap();
    let untrained = Model::from_keras(&source).unwrap();
    assert_ne!(
        values(model.weight("hidden/kernel").unwrap().var.as_tensor()),
        values(untrained.weight("hidden/kernel").unwrap().var.as_tensor()),
        "training moved the weights"
    );
    let data = dir.join("d.csv");
    let (ok, text) = kiln(&[
        "evaluate",
        part.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{text}");
    let logs: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"));
    let mut x = Vec::new();
    let mut y = Vec::new();
    for line in std::fs::read_to_string(&data).unwrap().lines().skip(1) {
        let v: Vec<f32> = line.split(',').map(|s| s.parse().unwrap()).collect();
        x.extend_from_slice(&v[..6]);
        let mut one_hot = [0f32; 4];
        one_hot[v[6] as usize] = 1.0;
        y.extend_from_slice(&one_hot);
    }
    let x = Tensor::from_vec(x, (24, 6), &Device::Cpu).unwrap();
    let y = Tensor::from_vec(y, (24, 4), &Device::Cpu).unwrap();
    let want = model
        .evaluate(&Dataset::new(x.clone(), y).unwrap(), 256)
        .unwrap();
    let got = logs["loss"].as_f64().unwrap_or_else(|| panic!("{logs}"));
    assert!(
        (got - want.get("loss").unwrap()).abs() < 1e-6,
        "{got} vs {want:?}"
    );
    let pout = dir.join("p.npy");
    let (ok, text) = kiln(&[
        "predict",
        part.to_str().unwrap(),
        "--input",
        data.to_str().unwrap(),
        "--output",
        pout.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let p = Tensor::read_npy(&pout).unwrap();
    assert_eq!(values(&p), values(&model.predict(&[x], 64).unwrap()[0]));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `get_weights` / `set_weights` follow Keras' `model.get_weights()` order on a branching
/// graph (tests/fixtures/keras/weights_order.json, from real Keras): by depth from the
/// outputs, so the deeper branch's first layer comes before a shallower branch made first.
#[test]
fn get_weights_follow_keras_order_on_a_branching_graph() {
    let c = {
        let text = std::fs::read_to_string(fixture("weights_order.json")).unwrap();
        serde_json::from_str::<Value>(&text).unwrap()
    };
    let keras: Vec<(String, Vec<usize>)> = serde_json::from_value(c["weights"].clone()).unwrap();
    let left = Input::named("left", [2]);
    let right = Input::named("right", [3]);
    let r1 = Dense::new(4).with_name("r1").apply(&right).unwrap();
    let l1 = Dense::new(4).with_name("l1").apply(&left).unwrap();
    let l2 = Dense::new(4)
        .with_name("l2")
        .use_bias(false)
        .apply(&l1)
        .unwrap();
    let joined = Concatenate::new()
        .with_name("join")
        .apply_many(&[&r1, &l2])
        .unwrap();
    let bn = BatchNormalization::new()
        .with_name("bn")
        .apply(&joined)
        .unwrap();
    let out = Dense::new(1).with_name("out").apply(&bn).unwrap();
    let model = Model::new(&[left, right], &[out]).unwrap();
    let listed: Vec<(String, Vec<usize>)> = model
        .weights()
        .iter()
        .map(|w| (w.name.clone(), w.shape().to_vec()))
        .collect();
    assert_eq!(listed, keras);
    let keras_layers: Vec<String> = serde_json::from_value(c["layers"].clone()).unwrap();
    let without_inputs: Vec<&str> = keras_layers
        .iter()
        .map(String::as_str)
        .filter(|n| !["left", "right"].contains(n))
        .collect();
    assert_eq!(model.layer_names(), without_inputs);
    // Values given in Keras' order land on the weights Keras' order names.
    let values: Vec<Tensor> = keras
        .iter()
        .enumerate()
        .map(|(i, (_, s))| Tensor::full(i as f32, s.clone(), &Device::Cpu).unwrap())
        .collect();
    model.set_weights(&values).unwrap();
    for (i, (name, _)) in keras.iter().enumerate() {
        let got = values_of(&model, name);
        assert!(got.iter().all(|v| *v == i as f64), "{name}: {got:?}");
    }
    let back = model.get_weights().unwrap();
    assert_eq!(back.len(), keras.len());
}

fn values_of(model: &Model, name: &str) -> Vec<f64> {
    values(model.weight(name).unwrap().var.as_tensor())
}

/// Keras stores `model.weights.h5` uncompressed in the zip, so its HDF5 signature can sit at
/// an offset where HDF5 allows a superblock (512, 1024, …): such a `.keras` file is still an
/// archive, not a legacy `.h5` file (a real Keras file with its weights at byte 8192 was read
/// as HDF5 and refused). Each offset is made by padding config.json with spaces.
#[test]
fn a_keras_archive_whose_weights_start_where_hdf5_could_is_still_an_archive() {
    use std::io::{Read, Write};
    let mut zip =
        zip::ZipArchive::new(std::fs::File::open(fixture("mlp_sequential.keras")).unwrap())
            .unwrap();
    let mut parts: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..zip.len() {
        let mut f = zip.by_index(i).unwrap();
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).unwrap();
        parts.push((f.name().unwrap().to_string(), bytes));
    }
    parts.sort_by_key(|(n, _)| n == "model.weights.h5");
    let c = case("mlp_sequential");
    let mut want = Vec::new();
    flat(&c["predictions"][0], &mut want);
    let dir = std::env::temp_dir().join(format!("kiln-zip-offset-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |path: &Path, pad: usize| -> u64 {
        let mut w = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for (n, bytes) in &parts {
            w.start_file(n.as_str(), stored).unwrap();
            w.write_all(bytes).unwrap();
            if n == "config.json" {
                w.write_all(&vec![b' '; pad]).unwrap();
            }
        }
        w.finish().unwrap();
        let mut z = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
        let start = z.by_name("model.weights.h5").unwrap().data_start();
        start.expect("a member's data offset")
    };
    let start = write(&dir.join("unpadded.keras"), 0);
    // The superblock offsets HDF5 searches (powers of two from 512) past the other members.
    let offsets: Vec<u64> = (9..20)
        .map(|k| 1u64 << k)
        .filter(|o| *o >= start)
        .take(3)
        .collect();
    for offset in offsets {
        let path = dir.join(format!("weights_at_{offset}.keras"));
        assert_eq!(write(&path, (offset - start) as usize), offset);
        let model = Model::from_keras(&path).unwrap_or_else(|e| panic!("offset {offset}: {e}"));
        assert_close(
            &format!("weights at {offset}"),
            &want,
            &values(&predictions(&model, &c)[0]),
            1e-5,
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
