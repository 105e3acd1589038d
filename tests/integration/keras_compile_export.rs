//! Compiled kiln models written as Keras: `save_keras` writes the compile configuration
//! (losses with their parameters, loss weights, metrics, the optimizer with its
//! hyperparameters, a registered custom loss by its name), checked against real Keras 3.15.1:
//! tests/fixtures/keras/compile_exports.json holds what Keras' `evaluate` and one
//! `train_on_batch` give on the files this test writes (check_compile_exports.py, run by hand
//! with `KILN_EXPORT_DIR=DIR cargo test --release --test integration keras_compile_export`).
//! What Keras' compile_config cannot hold is refused, naming it.

use candle_core::{DType, Device, Tensor};
use kiln::prelude::*;
use serde_json::{json, Value};
use std::io::Read;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/keras/{name}"))
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-keras-compile-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// Deterministic values in [-0.5, 0.5).
fn pattern(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32) / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn tensor(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let v: Vec<f32> = pattern(shape.iter().product(), seed)
        .iter()
        .map(|x| x * scale)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Every weight set from the pattern, so the test does not depend on kiln's initializers.
fn set_weights(model: &Model) {
    for (i, w) in model.weights().iter().enumerate() {
        w.var
            .set(&tensor(w.var.dims(), 100 + i as u64, 1.0))
            .unwrap();
    }
}

fn one_hot(classes: &[usize], n: usize) -> Tensor {
    let mut v = vec![0f32; classes.len() * n];
    for (i, c) in classes.iter().enumerate() {
        v[i * n + c] = 1.0;
    }
    Tensor::from_vec(v, (classes.len(), n), &Device::Cpu).unwrap()
}

fn binary(labels: &[f32]) -> Tensor {
    Tensor::from_vec(labels.to_vec(), (labels.len(), 1), &Device::Cpu).unwrap()
}

/// Registers the custom loss once (the tests of one binary share the registry).
fn register_custom() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        kiln::losses::register(
            "Custom>kiln_scaled_mse",
            loss_fn("kiln_scaled_mse", |t: &Tensor, p: &Tensor| {
                Ok(((p - t)?.sqr()?.mean(candle_core::D::Minus1)? * 2.0)?)
            }),
        );
    });
}

/// The compiled models: each with its data (inputs, targets).
fn cases() -> Vec<(&'static str, Model, Vec<Tensor>, Vec<Tensor>)> {
    register_custom();
    let mut out = Vec::new();

    // One output: label-smoothed crossentropy on logits, Adam with clipnorm, an L2 penalty.
    let x = Input::named("x", [5]);
    let h = Dense::new(6)
        .activation(Activation::Tanh)
        .kernel_regularizer(L2::new(1e-2))
        .with_name("hidden")
        .apply(&x)
        .unwrap();
    let y = Dense::new(3).with_name("logits").apply(&h).unwrap();
    let mut m = Model::builder(&[x], &[y]).seed(1).build().unwrap();
    set_weights(&m);
    m.compile(
        Compile::new(Adam::new(0.02).beta_1(0.8).epsilon(1e-6).clipnorm(0.5))
            .loss(
                CategoricalCrossentropy::new()
                    .from_logits(true)
                    .label_smoothing(0.1),
            )
            .metric(Accuracy::categorical())
            .metric("mae"),
    )
    .unwrap();
    out.push((
        "compiled_single",
        m,
        vec![tensor(&[8, 5], 1, 4.0)],
        vec![one_hot(&[0, 1, 2, 2, 1, 0, 0, 1], 3)],
    ));

    // Two outputs: Huber(delta) and binary crossentropy per output, a loss weight, SGD with
    // Nesterov momentum, a metric on one output.
    let x = Input::named("x", [4]);
    let h = Dense::new(6)
        .activation(Activation::Relu)
        .with_name("trunk")
        .apply(&x)
        .unwrap();
    let reg = Dense::new(2).with_name("reg").apply(&h).unwrap();
    let cls = Dense::new(1)
        .activation(Activation::Sigmoid)
        .with_name("cls")
        .apply(&h)
        .unwrap();
    let mut m = Model::builder(&[x], &[reg, cls]).seed(2).build().unwrap();
    set_weights(&m);
    m.compile(
        Compile::new(Sgd::new(0.1).momentum(0.9).nesterov(true))
            .loss_for("reg", Huber::new().delta(0.5))
            .loss_for("cls", BinaryCrossentropy::new().label_smoothing(0.2))
            .loss_weight_for("reg", 1.0)
            .loss_weight_for("cls", 0.3)
            .metric_for("cls", "binary_accuracy")
            .weighted_metric_for("reg", "mse"),
    )
    .unwrap();
    out.push((
        "compiled_two_heads",
        m,
        vec![tensor(&[6, 4], 2, 4.0)],
        vec![tensor(&[6, 2], 3, 2.0), binary(&[1., 0., 0., 1., 1., 0.])],
    ));

    // A registered custom loss, centered RMSprop with momentum and clipvalue.
    let x = Input::named("x", [3]);
    let y = Dense::new(2).with_name("out").apply(&x).unwrap();
    let mut m = Model::builder(&[x], &[y]).seed(3).build().unwrap();
    set_weights(&m);
    m.compile(
        Compile::new(
            RmsProp::new(0.01)
                .rho(0.8)
                .momentum(0.5)
                .centered(true)
                .clipvalue(0.2),
        )
        .loss("Custom>kiln_scaled_mse"),
    )
    .unwrap();
    out.push((
        "compiled_custom",
        m,
        vec![tensor(&[5, 3], 4, 4.0)],
        vec![tensor(&[5, 2], 5, 2.0)],
    ));

    // AdamW with global clipping, a sum reduction, sparse labels.
    let x = Input::named("x", [4]);
    let y = Dense::new(3).with_name("out").apply(&x).unwrap();
    let mut m = Model::builder(&[x], &[y]).seed(4).build().unwrap();
    set_weights(&m);
    m.compile(
        Compile::new(
            AdamW::new(0.05)
                .weight_decay(0.1)
                .beta_2(0.99)
                .global_clipnorm(1.0),
        )
        .loss(
            SparseCategoricalCrossentropy::new()
                .from_logits(true)
                .with_reduction(Reduction::Sum),
        )
        .metric("accuracy"),
    )
    .unwrap();
    out.push((
        "compiled_adamw",
        m,
        vec![tensor(&[6, 4], 6, 4.0)],
        vec![Tensor::new(&[[0f32], [2.], [1.], [1.], [0.], [2.]], &Device::Cpu).unwrap()],
    ));
    out
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn nested(t: &Tensor) -> Value {
    let dims = t.dims().to_vec();
    let v = values(t);
    fn build(v: &[f64], dims: &[usize]) -> Value {
        match dims.split_first() {
            None => json!(v[0]),
            Some((&n, rest)) => {
                let step = rest.iter().product::<usize>();
                Value::Array((0..n).map(|i| build(&v[i * step..], rest)).collect())
            }
        }
    }
    build(&v, &dims)
}

fn flat(v: &Value, out: &mut Vec<f64>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flat(x, out)),
        x => out.push(x.as_f64().unwrap()),
    }
}

/// The evaluate loss, and every weight after one step on the whole batch.
fn loss_and_step(model: &mut Model, x: &[Tensor], y: &[Tensor]) -> (f64, Vec<(String, Vec<f64>)>) {
    let n = x[0].dims()[0];
    let data = Dataset::multi(x.to_vec(), y.to_vec()).unwrap();
    let loss = model.evaluate(&data, n).unwrap().get("loss").unwrap();
    model
        .fit(
            &data,
            Fit::new().epochs(1).batch_size(n).shuffle(false).quiet(),
        )
        .unwrap();
    let weights = model
        .weights()
        .iter()
        .map(|w| (w.name.clone(), values(w.var.as_tensor())))
        .collect();
    (loss, weights)
}

fn compile_config_of(path: &Path) -> Value {
    let mut zip = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    let mut text = String::new();
    zip.by_name("config.json")
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["compile_config"].clone()
}

fn close(what: &str, want: f64, got: f64, rtol: f64) {
    assert!(
        (want - got).abs() <= rtol * want.abs().max(1.0),
        "{what}: want {want}, got {got}"
    );
}

/// Keras loads each file compiled: its `evaluate` loss and its weights after one
/// `train_on_batch` are kiln's (compile_exports.json); and kiln reads the file back to the
/// same loss and step.
#[test]
fn compiled_models_export_their_compile_configuration() {
    let keras: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("compile_exports.json")).unwrap())
            .unwrap();
    for (name, mut model, x, y) in cases() {
        let path = temp(&format!("{name}.keras"));
        model
            .save_keras(&path)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut back = Model::from_keras(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(back.metric_names(), model.metric_names(), "{name}");
        if let Ok(dir) = std::env::var("KILN_EXPORT_DIR") {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(&path, Path::new(&dir).join(format!("{name}.keras"))).unwrap();
            let (loss, after) = loss_and_step(&mut back, &x, &y);
            let case = json!({
                "x": x.iter().map(nested).collect::<Vec<_>>(),
                "y": y.iter().map(nested).collect::<Vec<_>>(),
                "kiln_loss": loss,
                "kiln_weights_after": after.iter().map(|(n, v)| (n.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
            });
            std::fs::write(
                Path::new(&dir).join(format!("{name}.json")),
                case.to_string(),
            )
            .unwrap();
            back = Model::from_keras(&path).unwrap();
        }
        let (loss, after) = loss_and_step(&mut model, &x, &y);
        let (back_loss, back_after) = loss_and_step(&mut back, &x, &y);
        assert_eq!(loss, back_loss, "{name}: loss of the re-imported model");
        assert_eq!(after, back_after, "{name}: step of the re-imported model");
        std::fs::remove_file(&path).unwrap();
        if std::env::var("KILN_EXPORT_DIR").is_ok() {
            continue; // writing the files for check_compile_exports.py, which makes the fixture
        }
        let want = &keras[name];
        close(
            &format!("{name} loss"),
            want["loss"].as_f64().unwrap(),
            loss,
            1e-5,
        );
        for (wname, got) in &after {
            let mut wv = Vec::new();
            flat(&want["weights_after"][wname], &mut wv);
            assert_eq!(wv.len(), got.len(), "{name} {wname}");
            for (i, (w, g)) in wv.iter().zip(got).enumerate() {
                close(&format!("{name} {wname}[{i}]"), *w, *g, 1e-5);
            }
        }
    }
}

#[test]
fn the_compile_configuration_is_written_with_every_parameter() {
    let (_, model, _, _) = cases().swap_remove(1);
    let path = temp("two_heads_config.keras");
    model.save_keras(&path).unwrap();
    let cc = compile_config_of(&path);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(cc["optimizer"]["class_name"], "SGD");
    assert_eq!(cc["optimizer"]["config"]["momentum"], 0.9);
    assert_eq!(cc["optimizer"]["config"]["nesterov"], true);
    assert_eq!(cc["loss"]["reg"]["class_name"], "Huber");
    assert_eq!(cc["loss"]["reg"]["config"]["delta"], 0.5);
    assert_eq!(cc["loss"]["cls"]["config"]["label_smoothing"], 0.2);
    assert_eq!(cc["loss_weights"], json!({"reg": 1.0, "cls": 0.3}));
    assert_eq!(cc["metrics"], json!({"cls": ["binary_accuracy"]}));
    assert_eq!(cc["weighted_metrics"], json!({"reg": ["mse"]}));
    let (_, model, _, _) = cases().swap_remove(2);
    model.save_keras(&path).unwrap();
    let cc = compile_config_of(&path);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(
        cc["loss"],
        json!({"module": "builtins", "class_name": "function",
               "config": "Custom>kiln_scaled_mse", "registered_name": "function"})
    );
}

/// Import a compiled Keras fixture, export it, import the export: the same compile
/// configuration, and the re-imported model still takes Keras' own training step.
#[test]
fn an_imported_compile_configuration_round_trips() {
    for file in [
        "functional_two_heads.keras",
        "nested_shared.keras",
        "cnn2d.keras",
    ] {
        let first = Model::from_keras(fixture(file)).unwrap();
        let a = temp(&format!("a_{file}"));
        first.save_keras(&a).unwrap();
        let second = Model::from_keras(&a).unwrap();
        let b = temp(&format!("b_{file}"));
        second.save_keras(&b).unwrap();
        let (ca, cb) = (compile_config_of(&a), compile_config_of(&b));
        assert_eq!(ca, cb, "{file}");
        assert_eq!(second.metric_names(), first.metric_names(), "{file}");
        std::fs::remove_file(&a).unwrap();
        std::fs::remove_file(&b).unwrap();
    }
    // What the original file said survives the trip.
    let m = Model::from_keras(fixture("functional_two_heads.keras")).unwrap();
    let a = temp("heads.keras");
    m.save_keras(&a).unwrap();
    let cc = compile_config_of(&a);
    std::fs::remove_file(&a).unwrap();
    assert_eq!(cc["optimizer"]["config"]["nesterov"], true);
    assert!((cc["optimizer"]["config"]["learning_rate"].as_f64().unwrap() - 0.05).abs() < 1e-7);
    assert_eq!(cc["loss"]["cls"]["config"]["from_logits"], true);
    assert_eq!(cc["loss"]["cls"]["config"]["label_smoothing"], 0.1);
    assert_eq!(cc["loss"]["reg"]["class_name"], "MeanSquaredError");
    assert_eq!(cc["loss_weights"], json!({"reg": 1.0, "cls": 0.5}));
    assert_eq!(cc["metrics"], json!({"cls": ["accuracy"]}));
}

/// A model recompiled after its import exports the compile configuration it has now.
#[test]
fn a_recompiled_import_exports_its_new_compile_configuration() {
    let mut m = Model::from_keras(fixture("mlp_sequential.keras")).unwrap();
    m.compile(Compile::new(Sgd::new(0.3)).loss("mse")).unwrap();
    let a = temp("recompiled.keras");
    m.save_keras(&a).unwrap();
    let cc = compile_config_of(&a);
    std::fs::remove_file(&a).unwrap();
    assert_eq!(cc["optimizer"]["class_name"], "SGD");
    assert_eq!(cc["optimizer"]["config"]["learning_rate"], 0.3);
    assert_eq!(cc["loss"]["class_name"], "MeanSquaredError");
    assert_eq!(cc["metrics"], Value::Null);
}

fn refusal(compile: Compile, added: bool) -> String {
    let x = Input::named("x", [3]);
    let y = Dense::new(2).with_name("out").apply(&x).unwrap();
    let mut m = Model::builder(&[x], &[y]).seed(1).build().unwrap();
    if added {
        m.add_loss("sparsity", |t: &Tensors| {
            Ok((t.output("out")?.abs()?.mean_all()? * 1e-3)?)
        })
        .unwrap();
    }
    m.compile(compile).unwrap();
    let path = temp("refused.keras");
    let msg = m.save_keras(&path).unwrap_err().to_string();
    assert!(!path.exists(), "a file was written: {msg}");
    msg
}

#[test]
fn what_keras_cannot_hold_is_refused_naming_it() {
    let msg = refusal(
        Compile::new(Adam::new(1e-3)).loss(loss_fn("my_unregistered", |t: &Tensor, p: &Tensor| {
            Ok((p - t)?.abs()?.mean(candle_core::D::Minus1)?)
        })),
        false,
    );
    assert!(
        msg.contains("`my_unregistered`") && msg.contains("kiln::losses::register"),
        "{msg}"
    );
    // A metric with parameters is written as a Keras metric object (keras_metrics.rs); a
    // closure of your own has no Keras class.
    let msg = refusal(
        Compile::new(Adam::new(1e-3))
            .loss("mse")
            .metric(kiln::metrics::metric_fn(
                "my_gap",
                |t: &Tensor, p: &Tensor| {
                    Ok((p - t)?
                        .abs()?
                        .max_keepdim(candle_core::D::Minus1)?
                        .squeeze(1)?)
                },
            )),
        false,
    );
    assert!(msg.contains("metric `my_gap`"), "{msg}");
    let msg = refusal(Compile::new(Adam::new(1e-3)).loss("mse"), true);
    assert!(msg.contains("added loss `sparsity`"), "{msg}");
}

/// `kiln export` of a trained run folder writes its compile configuration; a run with an
/// added term (FGSM), which Keras cannot hold, is refused naming it, and `--uncompiled`
/// writes it uncompiled.
#[test]
fn kiln_export_writes_the_runs_compile_configuration() {
    let dir = temp("cli");
    std::fs::create_dir_all(&dir).unwrap();
    let kiln = |args: &[&str]| {
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
    };
    let run_file = |added: &str| {
        format!(
            r#"seed = 1
[data]
source = "blobs"
samples = 30
[model]
layers = [{{ type = "dense", name = "hidden", units = 4, activation = "relu" }}, {{ type = "dense", name = "out", units = 1 }}]
[compile]
optimizer = {{ type = "adam", learning_rate = 0.02, beta_1 = 0.85 }}
loss = {{ type = "huber", delta = 0.5 }}
metrics = ["mae"]
{added}
[fit]
epochs = 1
batch_size = 10
"#
        )
    };
    for (tag, added) in [
        ("plain", ""),
        (
            "fgsm",
            "[[added]]\nkind = \"fgsm\"\nepsilon = 0.05\nmultiplier = 0.5",
        ),
    ] {
        let toml = dir.join(format!("{tag}.toml"));
        std::fs::write(&toml, run_file(added)).unwrap();
        let run = dir.join(format!("run_{tag}"));
        let (ok, text) = kiln(&[
            "train",
            toml.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
            "--quiet",
        ]);
        assert!(ok, "{text}");
        let out = dir.join(format!("{tag}.keras"));
        let (ok, text) = kiln(&[
            "export",
            run.to_str().unwrap(),
            "--keras",
            out.to_str().unwrap(),
        ]);
        if tag == "plain" {
            assert!(ok, "{text}");
            let cc = compile_config_of(&out);
            assert_eq!(cc["optimizer"]["config"]["beta_1"], 0.85);
            assert_eq!(cc["loss"]["class_name"], "Huber");
            assert_eq!(cc["loss"]["config"]["delta"], 0.5);
            assert_eq!(cc["metrics"], json!(["mae"]));
        } else {
            assert!(!ok && text.contains("added loss `adversarial`"), "{text}");
            assert!(!out.exists());
            let (ok, text) = kiln(&[
                "export",
                run.to_str().unwrap(),
                "--keras",
                out.to_str().unwrap(),
                "--uncompiled",
            ]);
            assert!(ok, "{text}");
            assert_eq!(compile_config_of(&out), Value::Null);
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A program that registers its losses again (each time a component starts) replaces the
/// registered value: a model compiled with the earlier one still exports it by name. A loss
/// built separately under a registered name is refused, saying to compile with `by_name`.
#[test]
fn a_loss_registered_again_still_exports_by_its_name() {
    let mae = |t: &Tensor, p: &Tensor| Ok((p - t)?.abs()?.mean(candle_core::D::Minus1)?);
    kiln::losses::register("Custom>registered_twice", loss_fn("registered_twice", mae));
    let x = Input::named("x", [3]);
    let y = Dense::new(2).with_name("out").apply(&x).unwrap();
    let mut m = Model::builder(&[x], &[y]).seed(1).build().unwrap();
    m.compile(
        Compile::new(Adam::new(1e-3))
            .loss(kiln::losses::by_name("Custom>registered_twice").unwrap()),
    )
    .unwrap();
    kiln::losses::register("Custom>registered_twice", loss_fn("registered_twice", mae));
    let path = temp("registered_twice.keras");
    m.save_keras(&path).unwrap();
    let cc = compile_config_of(&path);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(
        cc["loss"],
        json!({"module": "builtins", "class_name": "function",
               "config": "Custom>registered_twice", "registered_name": "function"})
    );

    kiln::losses::register("separately_built", loss_fn("separately_built", mae));
    let msg = refusal(
        Compile::new(Adam::new(1e-3)).loss(loss_fn("separately_built", mae)),
        false,
    );
    assert!(
        msg.contains("not the value registered under `separately_built`")
            && msg.contains("kiln::losses::by_name(\"separately_built\")"),
        "{msg}"
    );
}
