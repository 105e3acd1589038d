//! Keras learning-rate schedules carried by a `.keras` file's compile_config. Each
//! sched_<name>.keras (make_keras_schedules.py, Keras 3.15.1 on JAX) compiles a small model with
//! `learning_rate=keras.optimizers.schedules.<Class>(…)`; keras_schedules.json holds every
//! weight after 4 `train_on_batch` steps on one batch, during which the rate changes. kiln
//! imports each file, trains the same 4 steps and must reach Keras' weights; the export must
//! carry the schedule back, and a checkpoint must carry the iteration count so that a resumed
//! run continues the schedule.

use candle_core::{Device, Tensor};
use kiln::prelude::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/keras/{name}"))
}

fn case() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("keras_schedules.json")).unwrap())
        .unwrap()
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
    let (n, m) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (n, m), &Device::Cpu).unwrap()
}

fn batch(case: &Value) -> Dataset {
    Dataset::new(matrix(&case["x"]), matrix(&case["y"])).unwrap()
}

/// The largest difference between kiln's weights and Keras' (by Keras' weight path).
fn worst_diff(model: &Model, weights: &Value) -> f64 {
    let mut worst = 0f64;
    for (path, w) in weights.as_object().unwrap() {
        let name = path.replace("/lstm_cell", "").replace("/gru_cell", "");
        let got: Vec<f32> = model
            .weight(&name)
            .unwrap_or_else(|e| panic!("{e}"))
            .var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want = w["values"].as_array().unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        for (g, k) in got.iter().zip(want) {
            worst = worst.max((f64::from(*g) - k.as_f64().unwrap()).abs());
        }
    }
    worst
}

fn names(case: &Value) -> Vec<String> {
    case["schedules"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

#[test]
fn every_schedule_trains_as_keras() {
    let case = case();
    let data = batch(&case);
    let mut worst = (0f64, String::new());
    for name in names(&case) {
        let mut model = kiln::keras::load(fixture(&format!("sched_{name}.keras")), true)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(model.learning_rate_schedule().is_some(), "{name}");
        for _ in 0..case["steps"].as_u64().unwrap() {
            model.train_on_batch(&data).unwrap();
        }
        let want = &case["schedules"][&name];
        let d = worst_diff(&model, &want["weights"]);
        assert!(d < 2e-5, "{name}: weights differ from Keras' by {d}");
        // The rate of the next step, as Keras' `optimizer.learning_rate` after the steps.
        let lr = model.learning_rate().unwrap();
        let keras_lr = want["learning_rate_after"].as_f64().unwrap();
        assert!(
            (lr - keras_lr).abs() <= 1e-7 * keras_lr.abs().max(1e-3),
            "{name}: {lr} vs {keras_lr}"
        );
        if d > worst.0 {
            worst = (d, name.clone());
        }
    }
    eprintln!(
        "schedules: worst weight difference vs Keras {:e} ({})",
        worst.0, worst.1
    );
}

#[test]
fn schedules_survive_export_and_reimport() {
    let case = case();
    let data = batch(&case);
    let dir = crate::support::temp("keras_schedules", "export");
    for name in names(&case) {
        let src = fixture(&format!("sched_{name}.keras"));
        let original: Value = {
            let m = kiln::keras::load(&src, true).unwrap();
            let path = dir.join(format!("{name}.keras"));
            kiln::keras::save(&m, &path, true).unwrap();
            if let Some(out) = std::env::var_os("KILN_EXPORT_DIR") {
                std::fs::create_dir_all(&out).unwrap();
                std::fs::copy(&path, Path::new(&out).join(format!("sched_{name}.keras"))).unwrap();
            }
            let back = kiln::keras::load(&path, true).unwrap();
            assert_eq!(
                back.learning_rate_schedule(),
                m.learning_rate_schedule(),
                "{name}"
            );
            // Trained after the round trip, the model still follows Keras.
            let mut back = back;
            for _ in 0..case["steps"].as_u64().unwrap() {
                back.train_on_batch(&data).unwrap();
            }
            let d = worst_diff(&back, &case["schedules"][&name]["weights"]);
            assert!(d < 2e-5, "{name} after export: {d}");
            let text = zip_config(&path);
            text["compile_config"]["optimizer"]["config"]["learning_rate"].clone()
        };
        let keras =
            zip_config(&src)["compile_config"]["optimizer"]["config"]["learning_rate"].clone();
        assert_eq!(
            original, keras,
            "{name}: the exported schedule is not the one Keras wrote"
        );
    }
}

/// config.json of a .keras archive.
fn zip_config(path: &Path) -> Value {
    use std::io::Read;
    let mut zip = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    let mut text = String::new();
    zip.by_name("config.json")
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn resumed_checkpoint_continues_the_schedule() {
    let case = case();
    let data = batch(&case);
    let src = fixture("sched_cosine_warmup.keras");
    let mut straight = kiln::keras::load(&src, true).unwrap();
    for _ in 0..3 {
        straight.train_on_batch(&data).unwrap();
    }
    let dir = crate::support::temp("keras_schedules", "resume");
    let mut first = kiln::keras::load(&src, true).unwrap();
    for _ in 0..2 {
        first.train_on_batch(&data).unwrap();
    }
    first
        .save_checkpoint(&dir, "ckpt", 0, &kiln::model::History::default())
        .unwrap();
    let mut resumed = kiln::keras::load(&src, true).unwrap();
    resumed.load_checkpoint(&dir, "ckpt").unwrap();
    resumed.train_on_batch(&data).unwrap();
    for w in straight.weights() {
        let a: Vec<f32> = w.var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = resumed
            .weight(&w.name)
            .unwrap()
            .var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b, "{}", w.name);
    }
    assert_eq!(straight.learning_rate(), resumed.learning_rate());
}

#[test]
fn rate_setting_callbacks_and_calls_are_refused_with_a_schedule() {
    let case = case();
    let data = batch(&case);
    let mut model = kiln::keras::load(fixture("sched_exponential.keras"), true).unwrap();
    let e = model.set_learning_rate(0.5).unwrap_err().to_string();
    assert!(e.contains("ExponentialDecay"), "{e}");
    let plateau = kiln::callbacks::ReduceLROnPlateau::new("loss");
    let fit = Fit::new().epochs(1).batch_size(8).callback(plateau);
    let e = model.fit(&data, fit).unwrap_err().to_string();
    assert!(
        e.contains("ReduceLROnPlateau") && e.contains("ExponentialDecay"),
        "{e}"
    );
    let sched = kiln::callbacks::LearningRateScheduler::new(kiln::callbacks::Schedule::Step {
        initial: 0.1,
        factor: 0.5,
        every: 1,
    });
    let fit = Fit::new().epochs(1).batch_size(8).callback(sched);
    let e = model.fit(&data, fit).unwrap_err().to_string();
    assert!(
        e.contains("LearningRateScheduler") && e.contains("ExponentialDecay"),
        "{e}"
    );
}

const RUN: &str = r#"seed = 0
[data]
source = "blobs"
samples = 40
[model]
layers = [{ type = "dense", name = "out", units = 1 }]
[compile]
loss = "mse"
optimizer = { type = "adam", learning_rate = SCHEDULE }
"#;

fn run_file(schedule: &str) -> std::result::Result<Model, String> {
    let text = RUN.replace("SCHEDULE", schedule);
    let run = kiln::run::RunFile::from_text("sched.toml", &text, PathBuf::new())
        .map_err(|e| e.to_string())?;
    run.prepare(None, &Device::Cpu)
        .map(|p| p.model)
        .map_err(|e| e.to_string())
}

#[test]
fn run_file_schedules_are_built_and_strict() {
    use kiln::optimizers::LearningRateSchedule as S;
    let model = run_file(
        r#"{ type = "exponential_decay", initial_learning_rate = 0.1, decay_steps = 10, decay_rate = 0.5, staircase = true }"#,
    )
    .unwrap();
    assert_eq!(
        model.learning_rate_schedule(),
        Some(&S::ExponentialDecay {
            initial_learning_rate: 0.1,
            decay_steps: 10.0,
            decay_rate: 0.5,
            staircase: true
        })
    );
    let model = run_file(
        r#"{ type = "piecewise_constant_decay", boundaries = [10, 20], values = [0.1, 0.01, 0.001] }"#,
    )
    .unwrap();
    assert_eq!(model.learning_rate(), Some(f64::from(0.1f32)));
    let model = run_file(
        r#"{ type = "cosine_decay", initial_learning_rate = 0.0, decay_steps = 100, warmup_target = 0.1, warmup_steps = 10 }"#,
    )
    .unwrap();
    assert!(matches!(
        model.learning_rate_schedule(),
        Some(S::CosineDecay {
            warmup_target: Some(_),
            ..
        })
    ));
    for (bad, says) in [
        (
            r#"{ type = "exponential_decay", initial_learning_rate = 0.1, decay_steps = 10, decay_rate = 0.5, stair = true }"#,
            "stair",
        ),
        (
            r#"{ type = "exponential_decay", initial_learning_rate = 0.1, decay_steps = 0, decay_rate = 0.5 }"#,
            "decay_steps",
        ),
        (
            r#"{ type = "exponential_decay", initial_learning_rate = 0.1, decay_rate = 0.5 }"#,
            "decay_steps",
        ),
        (
            r#"{ type = "polynomial_decay", initial_learning_rate = "0.1", decay_steps = 3 }"#,
            "initial_learning_rate",
        ),
        (
            r#"{ type = "piecewise_constant_decay", boundaries = [10], values = [0.1] }"#,
            "values",
        ),
        (
            r#"{ type = "step_decay", initial_learning_rate = 0.1 }"#,
            "step_decay",
        ),
    ] {
        let e = run_file(bad).expect_err(bad);
        assert!(e.contains(says) && e.contains("sched.toml"), "{bad}: {e}");
    }
}

#[test]
fn unknown_keras_schedule_keys_and_classes_are_errors() {
    use std::io::{Read, Write};
    let dir = crate::support::temp("keras_schedules", "strict");
    let src = fixture("sched_exponential.keras");
    for (edit, says) in [
        (
            ("\"staircase\": false", "\"staircase\": false, \"stair\": 1"),
            "stair",
        ),
        (
            (
                "\"class_name\": \"ExponentialDecay\"",
                "\"class_name\": \"StepDecay\"",
            ),
            "StepDecay",
        ),
        (("\"decay_steps\": 2", "\"decay_steps\": 0"), "decay_steps"),
    ] {
        let mut zip = zip::ZipArchive::new(std::fs::File::open(&src).unwrap()).unwrap();
        let path = dir.join("edited.keras");
        let mut out = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        for i in 0..zip.len() {
            let mut f = zip.by_index(i).unwrap();
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes).unwrap();
            let name = f.name().unwrap().to_string();
            if name == "config.json" {
                let text = String::from_utf8(bytes).unwrap();
                assert!(text.contains(edit.0), "{}", edit.0);
                bytes = text.replace(edit.0, edit.1).into_bytes();
            }
            let opts = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored);
            out.start_file(name, opts).unwrap();
            out.write_all(&bytes).unwrap();
        }
        out.finish().unwrap();
        let e = kiln::keras::load(&path, true).unwrap_err().to_string();
        assert!(e.contains(says) && e.contains("learning_rate"), "{e}");
    }
}

/// A tensor from nested JSON lists.
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

fn constraint_batch(case: &Value) -> Dataset {
    let c = &case["constraints"];
    Dataset::multi(
        vec![tensor(&c["img"]), tensor(&c["tokens"])],
        vec![tensor(&c["y"])],
    )
    .unwrap()
}

/// constraints.keras: MaxNorm over three axes on a Conv2D kernel and NonNeg on its bias,
/// MinMaxNorm/NonNeg on BatchNormalization's gamma/beta, MaxNorm(axis=1) on an Embedding,
/// UnitNorm/MaxNorm/NonNeg on an LSTM's kernel/recurrent kernel/bias, MaxNorm(axis=1)/
/// UnitNorm(axis=1)/MinMaxNorm on a GRU's, MaxNorm/NonNeg on a Dense; SGD with momentum and
/// a large rate so that every constraint binds. 4 steps must reach Keras' weights.
#[test]
fn constraints_train_as_keras() {
    let case = case();
    let data = constraint_batch(&case);
    let mut model = kiln::keras::load(fixture("constraints.keras"), true).unwrap();
    let constrained = model
        .weights()
        .iter()
        .filter(|w| w.constraint.is_some())
        .count();
    assert_eq!(constrained, 13);
    for _ in 0..case["steps"].as_u64().unwrap() {
        model.train_on_batch(&data).unwrap();
    }
    let d = worst_diff(&model, &case["constraints"]["weights"]);
    eprintln!("constraints: worst weight difference vs Keras after 4 steps {d:e}");
    assert!(d < 2e-5, "weights differ from Keras' by {d}");
}

#[test]
fn constraints_survive_export_and_reimport() {
    let case = case();
    let data = constraint_batch(&case);
    let src = fixture("constraints.keras");
    let model = kiln::keras::load(&src, true).unwrap();
    let path = crate::support::temp("keras_schedules", "constraints").join("c.keras");
    kiln::keras::save(&model, &path, true).unwrap();
    if let Some(out) = std::env::var_os("KILN_EXPORT_DIR") {
        std::fs::create_dir_all(&out).unwrap();
        std::fs::copy(&path, Path::new(&out).join("constraints.keras")).unwrap();
    }
    let mut back = kiln::keras::load(&path, true).unwrap();
    for w in model.weights() {
        assert_eq!(
            back.weight(&w.name).unwrap().constraint,
            w.constraint,
            "{}",
            w.name
        );
    }
    for _ in 0..case["steps"].as_u64().unwrap() {
        back.train_on_batch(&data).unwrap();
    }
    let d = worst_diff(&back, &case["constraints"]["weights"]);
    assert!(d < 2e-5, "after export: {d}");
    // Each layer's constraint is written as Keras wrote it.
    let ours = zip_config(&path);
    let keras = zip_config(&src);
    let layer = |c: &Value, name: &str| -> Value {
        c["config"]["layers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["config"]["name"] == name)
            .unwrap()["config"]
            .clone()
    };
    for (name, keys) in [
        ("conv", &["kernel_constraint", "bias_constraint"][..]),
        ("bn", &["gamma_constraint", "beta_constraint"][..]),
        ("emb", &["embeddings_constraint"][..]),
        (
            "lstm",
            &[
                "kernel_constraint",
                "recurrent_constraint",
                "bias_constraint",
            ][..],
        ),
        (
            "gru",
            &[
                "kernel_constraint",
                "recurrent_constraint",
                "bias_constraint",
            ][..],
        ),
        ("out", &["kernel_constraint", "bias_constraint"][..]),
    ] {
        for k in keys {
            let strip = |mut v: Value| {
                if let Some(o) = v.as_object_mut() {
                    o.remove("shared_object_id");
                }
                v
            };
            assert_eq!(
                strip(layer(&ours, name)[*k].clone()),
                strip(layer(&keras, name)[*k].clone()),
                "{name}.{k}"
            );
        }
    }
}

/// A weight as rows of values.
type Rows = Vec<Vec<f32>>;

/// Weights of a Rust-built model with constraints after `fit`, on one process or on a rank.
fn constrained_run(
    comm: Option<kiln::distributed::SharedCommunicator>,
) -> kiln::Result<(Rows, Rows)> {
    use kiln::constraints::Constraint;
    let x = Input::new([3]);
    let y = Dense::new(2)
        .kernel_constraint(Constraint::max_norm(0.1))
        .bias_constraint(Constraint::NonNeg)
        .with_name("d")
        .apply(&x)?;
    let mut model = Model::builder(&[x], &[y]).seed(1).build()?;
    model.compile(Compile::new(Sgd::new(1.0)).loss("mse"))?;
    let xs = Tensor::new(
        &[[1f32, 2., 3.], [-1., 0.5, 2.], [0., 1., -1.], [2., 2., 2.]],
        &Device::Cpu,
    )?;
    let ys = Tensor::new(
        &[[5f32, -5.], [4., -4.], [3., -3.], [6., -6.]],
        &Device::Cpu,
    )?;
    let mut fit = Fit::new().epochs(3).batch_size(4).quiet();
    if let Some(c) = comm {
        fit = fit.distributed(c);
    }
    model.fit(&Dataset::new(xs, ys)?, fit)?;
    let k = model.weight("d/kernel")?.var.as_tensor().to_vec2::<f32>()?;
    let b = model.weight("d/bias")?.var.as_tensor().to_vec1::<f32>()?;
    Ok((k, vec![b]))
}

/// A constraint on a model built in Rust holds after `fit`, on one process and on each of two
/// data-parallel ranks alike: the trainer applies it in the one place every update goes
/// through.
#[test]
fn builder_constraints_hold_after_fit_and_on_ranks() {
    let (k, b) = constrained_run(None).unwrap();
    for j in 0..2 {
        let norm: f32 = k.iter().map(|r| r[j] * r[j]).sum::<f32>().sqrt();
        assert!(norm <= 0.1 + 1e-6, "column {j} has norm {norm}");
    }
    assert!(b[0].iter().all(|v| *v >= 0.0), "{b:?}");
    let ranks: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = kiln::distributed::LocalGroup::new(2)
            .into_iter()
            .map(|rank| s.spawn(move || constrained_run(Some(std::sync::Arc::new(rank)))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    });
    for (r, (rk, rb)) in ranks.iter().enumerate() {
        for (a, w) in rk.iter().flatten().zip(k.iter().flatten()) {
            assert!((a - w).abs() < 1e-6, "rank {r}: kernel {rk:?} vs {k:?}");
        }
        for (a, w) in rb[0].iter().zip(&b[0]) {
            assert!((a - w).abs() < 1e-6, "rank {r}: bias {rb:?} vs {b:?}");
        }
    }
}

const RUN_C: &str = r#"seed = 0
[data]
source = "blobs"
samples = 40
[model]
layers = [{ type = "dense", name = "out", units = 1, kernel_constraint = CONSTRAINT }]
[compile]
loss = "mse"
optimizer = "sgd"
"#;

#[test]
fn run_file_constraints_are_built_and_strict() {
    use kiln::constraints::Constraint;
    let build = |c: &str| -> std::result::Result<Model, String> {
        let text = RUN_C.replace("CONSTRAINT", c);
        let run = kiln::run::RunFile::from_text("c.toml", &text, PathBuf::new())
            .map_err(|e| e.to_string())?;
        run.prepare(None, &Device::Cpu)
            .map(|p| p.model)
            .map_err(|e| e.to_string())
    };
    let m = build(r#"{ type = "max_norm", max_value = 2.0 }"#).unwrap();
    assert_eq!(
        m.weight("out/kernel").unwrap().constraint,
        Some(Constraint::max_norm(2.0))
    );
    let m = build(
        r#"{ type = "min_max_norm", min_value = 0.5, max_value = 1.5, rate = 0.5, axis = [0] }"#,
    )
    .unwrap();
    assert_eq!(
        m.weight("out/kernel").unwrap().constraint,
        Some(Constraint::min_max_norm(0.5, 1.5).rate(0.5).axis([0]))
    );
    for (bad, says) in [
        (r#"{ type = "max_norm", max = 2.0 }"#, "max"),
        (r#"{ type = "max_norm", max_value = "2" }"#, "max_value"),
        (r#"{ type = "unit_norm", axis = 0.5 }"#, "axis"),
        (r#"{ type = "radial" }"#, "radial"),
    ] {
        let e = build(bad).expect_err(bad);
        assert!(e.contains(says) && e.contains("c.toml"), "{bad}: {e}");
    }
}
