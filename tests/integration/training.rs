//! The total-loss rule, the loss contract, compile errors, determinism and training quality.

use candle_core::{DType, Device, Tensor, D};
use kiln::prelude::*;

fn small_model(seed: u64) -> Model {
    let x = Input::new([64]);
    let h = Dense::new(16)
        .activation(Activation::Relu)
        .kernel_regularizer(L2::new(1e-3))
        .apply(&x)
        .unwrap();
    let h = Dropout::new(0.2).apply(&h).unwrap();
    let y = Dense::new(10).with_name("digit").apply(&h).unwrap();
    Model::builder(&[x], &[y]).seed(seed).build().unwrap()
}

fn digits() -> Dataset {
    kiln::data::digits(&Device::Cpu).unwrap()
}

fn scce() -> SparseCategoricalCrossentropy {
    SparseCategoricalCrossentropy::new().from_logits(true)
}

#[test]
fn same_seed_same_history_to_the_last_bit() {
    let run = |seed: u64| {
        let mut m = small_model(seed);
        m.compile(
            Compile::new(Adam::new(1e-2))
                .loss(scce())
                .metric(Accuracy::sparse()),
        )
        .unwrap();
        m.fit(
            &digits(),
            Fit::new()
                .epochs(2)
                .batch_size(64)
                .validation_split(0.2)
                .seed(seed)
                .quiet(),
        )
        .unwrap()
    };
    let (a, b, c) = (run(5), run(5), run(6));
    // Every value but the clock's: epoch_time_s is the one series two runs never share.
    let values = |h: &History| h.without("epoch_time_s");
    assert_eq!(values(&a), values(&b));
    assert_ne!(values(&a), values(&c));
    let keys: Vec<&str> = a.epochs[0].keys().collect();
    assert_eq!(
        keys,
        [
            "loss",
            "digit_loss",
            "l2",
            "sparse_categorical_accuracy",
            "val_loss",
            "val_digit_loss",
            "val_l2",
            "val_sparse_categorical_accuracy",
            "epoch_time_s"
        ]
    );
    assert!(a
        .epochs
        .iter()
        .all(|l| l.get("epoch_time_s").unwrap() > 0.0));
}

#[test]
fn the_default_run_reaches_its_stated_accuracy() {
    let x = Input::new([64]);
    let h = Dense::new(64)
        .activation(Activation::Relu)
        .kernel_regularizer(L2::new(1e-4))
        .apply(&x)
        .unwrap();
    let y = Dense::new(10).apply(&h).unwrap();
    let mut m = Model::new(&[x], &[y]).unwrap();
    m.compile(
        Compile::new(Adam::new(3e-3))
            .loss(scce())
            .metric("accuracy"),
    )
    .unwrap();
    let (train, test) = digits().shuffled_split(0.2, 0).unwrap();
    m.fit(&train, Fit::new().epochs(25).quiet()).unwrap();
    let acc = m.evaluate(&test, 256).unwrap().get("accuracy").unwrap();
    assert!(acc >= 0.95, "held-out accuracy {acc}");
}

#[test]
fn a_loss_returning_a_scalar_breaks_the_contract() {
    let mut m = small_model(0);
    let reduced_too_early = loss_fn("my_mean_loss", |t: &Tensor, p: &Tensor| {
        let t = kiln::data::one_hot(t, 10)?;
        Ok((p - t)?.sqr()?.mean_all()?)
    });
    m.compile(Compile::new(Sgd::new(0.1)).loss(reduced_too_early))
        .unwrap();
    let err = m
        .fit(&digits(), Fit::new().batch_size(50).quiet())
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, kiln::Error::LossContract(_)), "{msg}");
    for needle in [
        "my_mean_loss",
        "digit",
        "[50]",
        "[]",
        "y_true [50]",
        "y_pred [50, 10]",
    ] {
        assert!(msg.contains(needle), "`{needle}` missing from: {msg}");
    }
}

#[test]
fn a_loss_with_the_wrong_batch_size_breaks_the_contract() {
    let mut m = small_model(0);
    let wrong = loss_fn("half", |_t: &Tensor, p: &Tensor| {
        Ok(p.narrow(0, 0, p.dims()[0] / 2)?.sqr()?.mean(D::Minus1)?)
    });
    m.compile(Compile::new(Sgd::new(0.1)).loss(wrong)).unwrap();
    let msg = m
        .fit(&digits(), Fit::new().batch_size(32).quiet())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("half") && msg.contains("[16]"), "{msg}");
}

#[test]
fn compile_rejects_what_does_not_fit_the_model() {
    let x = Input::new([4]);
    let a = Dense::new(2).with_name("a").apply(&x).unwrap();
    let b = Dense::new(1).with_name("b").apply(&x).unwrap();
    let mut m = Model::new(&[x], &[a, b]).unwrap();
    let err = |c: Compile, m: &mut Model| m.compile(c).unwrap_err().to_string();
    let msg = err(Compile::new(Sgd::new(0.1)), &mut m);
    assert!(msg.contains("no loss to optimize"), "{msg}");
    let msg = err(Compile::new(Sgd::new(0.1)).loss_for("c", "mse"), &mut m);
    assert!(msg.contains("`c`") && msg.contains("\"a\""), "{msg}");
    let msg = err(
        Compile::new(Sgd::new(0.1)).losses(vec!["mse".into()]),
        &mut m,
    );
    assert!(msg.contains("1 losses for 2 outputs"), "{msg}");
    let msg = err(
        Compile::new(Sgd::new(0.1))
            .loss("mse")
            .loss_weights(vec![1.0, 2.0, 3.0]),
        &mut m,
    );
    assert!(msg.contains("3 loss weights for 2 outputs"), "{msg}");
    let msg = err(
        Compile::new(Sgd::new(0.1))
            .loss_for("a", "mse")
            .loss_weight_for("b", 2.0),
        &mut m,
    );
    assert!(msg.contains("`b`, which has no loss"), "{msg}");
    let msg = err(Compile::new(Sgd::new(0.1)).loss("no_such_loss"), &mut m);
    assert!(msg.contains("unknown loss `no_such_loss`"), "{msg}");
    let msg = err(Compile::new(Sgd::new(-1.0)).loss("mse"), &mut m);
    assert!(msg.contains("learning rate"), "{msg}");
    let msg = err(
        Compile::new(Sgd::new(0.1).clipnorm(1.0).clipvalue(1.0)).loss("mse"),
        &mut m,
    );
    assert!(msg.contains("only one of"), "{msg}");
    let msg = err(
        Compile::new(Sgd::new(0.1)).loss(CategoricalFocalCrossentropy::new().gamma(-1.0)),
        &mut m,
    );
    assert!(msg.contains("gamma"), "{msg}");
    m.add_loss("a_loss", |t: &Tensors| Ok(t.output("a")?.sum_all()?))
        .unwrap();
    let msg = err(Compile::new(Sgd::new(0.1)).loss("mse"), &mut m);
    assert!(msg.contains("`a_loss`"), "{msg}");
    // An added loss alone is enough to compile.
    let x = Input::new([4]);
    let y = Dense::new(1).apply(&x).unwrap();
    let mut m = Model::new(&[x], &[y]).unwrap();
    m.add_loss("only", |t: &Tensors| {
        Ok(t.output("dense")?.sqr()?.mean_all()?)
    })
    .unwrap();
    m.compile(Compile::new(Sgd::new(0.1))).unwrap();
}

#[test]
fn class_weight_equals_the_matching_sample_weights() {
    let data = digits().slice(0, 300).unwrap();
    let weights: Vec<(usize, f64)> = (0..10).map(|c| (c, 1.0 + c as f64 / 4.0)).collect();
    let per_sample: Vec<f32> = data.targets()[0]
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|&c| 1.0 + c / 4.0)
        .collect();
    let weighted = data
        .clone()
        .with_sample_weight(Tensor::new(per_sample, &Device::Cpu).unwrap())
        .unwrap();
    let run = |d: &Dataset, fit: Fit| {
        let mut m = small_model(1);
        m.compile(Compile::new(Adam::new(1e-2)).loss(scce()))
            .unwrap();
        m.fit(d, fit.epochs(2).seed(3).quiet()).unwrap()
    };
    let a = run(&data, Fit::new().class_weight(weights));
    let b = run(&weighted, Fit::new());
    let t = "epoch_time_s";
    assert_eq!(a.without(t), b.without(t));
    let unweighted = run(&data, Fit::new());
    assert_ne!(a.without(t), unweighted.without(t));
}

#[test]
fn epoch_loss_is_the_sample_weighted_mean_of_batches() {
    // Batches of 3 and 2 with a constant per-batch loss: Keras reports Σ loss_b · n_b / Σ n_b.
    let x = Input::new([1]);
    let y = Dense::new(1)
        .use_bias(false)
        .kernel_initializer(Initializer::Zeros)
        .apply(&x)
        .unwrap();
    let mut m = Model::new(&[x], &[y]).unwrap();
    m.compile(Compile::new(Sgd::new(0.0)).loss("mse")).unwrap();
    let xs = Tensor::zeros((5, 1), DType::F32, &Device::Cpu).unwrap();
    let ys = Tensor::new(&[[1f32], [1.], [1.], [3.], [3.]], &Device::Cpu).unwrap();
    let data = Dataset::new(xs, ys).unwrap();
    let h = m
        .fit(&data, Fit::new().batch_size(3).shuffle(false).quiet())
        .unwrap();
    assert_eq!(h.get("loss").unwrap(), vec![(1.0 * 3.0 + 9.0 * 2.0) / 5.0]);
    assert_eq!(m.evaluate(&data, 3).unwrap().get("loss"), Some(4.2));
}

#[test]
fn dropout_acts_only_in_training() {
    let m = small_model(2);
    let x = digits().slice(0, 20).unwrap();
    let a = m.predict(x.inputs(), 7).unwrap();
    let b = m.predict(x.inputs(), 20).unwrap();
    let diff = (&a[0] - &b[0])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-6, "inference must not drop units (diff {diff})");
}

#[test]
fn bad_inputs_are_errors_that_name_the_input() {
    let mut m = small_model(0);
    m.compile(Compile::new(Sgd::new(0.1)).loss(scce())).unwrap();
    let x = Tensor::zeros((8, 63), DType::F32, &Device::Cpu).unwrap();
    let y = Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap();
    let msg = m
        .fit(&Dataset::new(x, y).unwrap(), Fit::new().quiet())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("input `input`") && msg.contains("[64]") && msg.contains("[8, 63]"),
        "{msg}"
    );
    let x = Tensor::zeros((8, 64), DType::F32, &Device::Cpu).unwrap();
    let y = Tensor::full(12f32, 8, &Device::Cpu).unwrap();
    let msg = m
        .fit(&Dataset::new(x.clone(), y).unwrap(), Fit::new().quiet())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("label 12"), "{msg}");
    let short = Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap();
    let msg = Dataset::new(x, short).unwrap_err().to_string();
    assert!(
        msg.contains("target 0") && msg.contains("8 samples"),
        "{msg}"
    );
    let mut fresh = small_model(0);
    let msg = fresh.fit(&digits(), Fit::new()).unwrap_err().to_string();
    assert!(msg.contains("not compiled"), "{msg}");
    let _ = &mut fresh;
}

#[test]
fn weights_survive_a_save_and_load() {
    let dir = std::env::temp_dir().join(format!("kiln-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    let a = small_model(1);
    a.save_weights(&path).unwrap();
    let b = small_model(2);
    let x = digits().slice(0, 5).unwrap();
    assert_ne!(
        a.predict(x.inputs(), 5).unwrap()[0]
            .to_vec2::<f32>()
            .unwrap(),
        b.predict(x.inputs(), 5).unwrap()[0]
            .to_vec2::<f32>()
            .unwrap()
    );
    b.load_weights(&path).unwrap();
    assert_eq!(
        a.predict(x.inputs(), 5).unwrap()[0]
            .to_vec2::<f32>()
            .unwrap(),
        b.predict(x.inputs(), 5).unwrap()[0]
            .to_vec2::<f32>()
            .unwrap()
    );
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "no temporary files left: {leftovers:?}");
    let msg = b
        .load_weights(dir.join("missing.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("missing.safetensors"), "{msg}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn sequential_and_functional_give_the_same_model() {
    let s = Sequential::new([64])
        .add(Dense::new(8).activation(Activation::Relu))
        .add(Dense::new(10))
        .seed(4)
        .build()
        .unwrap();
    let x = Input::new([64]);
    let h = Dense::new(8)
        .activation(Activation::Relu)
        .apply(&x)
        .unwrap();
    let y = Dense::new(10).apply(&h).unwrap();
    let f = Model::builder(&[x], &[y]).seed(4).build().unwrap();
    let d = digits().slice(0, 4).unwrap();
    assert_eq!(
        s.predict(d.inputs(), 4).unwrap()[0]
            .to_vec2::<f32>()
            .unwrap(),
        f.predict(d.inputs(), 4).unwrap()[0]
            .to_vec2::<f32>()
            .unwrap()
    );
    assert_eq!(s.layer_names(), ["dense", "dense_1"]);
}

#[test]
fn optimizers_follow_the_keras_update_rules() {
    // One parameter w = 1 and loss w² (gradient 2w) through a tiny model: x = 1, y_true = 0.
    let step = |opt: Box<dyn Fn() -> Compile>, steps: usize| -> f32 {
        let x = Input::new([1]);
        let y = Dense::new(1)
            .use_bias(false)
            .kernel_initializer(Initializer::Ones)
            .apply(&x)
            .unwrap();
        let mut m = Model::new(&[x], &[y]).unwrap();
        m.compile(opt()).unwrap();
        let data = Dataset::new(
            Tensor::new(&[[1f32]], &Device::Cpu).unwrap(),
            Tensor::new(&[[0f32]], &Device::Cpu).unwrap(),
        )
        .unwrap();
        m.fit(&data, Fit::new().epochs(steps).quiet()).unwrap();
        m.weights()[0]
            .var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0]
    };
    let close = |a: f32, b: f64| assert!((a as f64 - b).abs() < 1e-6, "{a} vs {b}");
    // SGD: w = 1 - 0.1·2 = 0.8
    close(
        step(Box::new(|| Compile::new(Sgd::new(0.1)).loss("mse")), 1),
        0.8,
    );
    // Momentum 0.9, two steps: m1 = -0.2, w1 = 0.8; m2 = 0.9·(-0.2) - 0.1·1.6 = -0.34, w2 = 0.46
    close(
        step(
            Box::new(|| Compile::new(Sgd::new(0.1).momentum(0.9)).loss("mse")),
            2,
        ),
        0.46,
    );
    // Nesterov, one step: m = -0.2, w = 1 + 0.9·(-0.2) - 0.2 = 0.62
    close(
        step(
            Box::new(|| Compile::new(Sgd::new(0.1).momentum(0.9).nesterov(true)).loss("mse")),
            1,
        ),
        0.62,
    );
    // Adam, one step: α = 0.1·√0.001/0.1, m = 0.2, v = 0.004 → w = 1 - α·0.2/(√0.004 + 1e-7)
    let alpha = 0.1 * (0.001f64).sqrt() / 0.1;
    close(
        step(Box::new(|| Compile::new(Adam::new(0.1)).loss("mse")), 1),
        1.0 - alpha * 0.2 / (0.004f64.sqrt() + 1e-7),
    );
    // AdamW: decay first, w·(1 - 0.1·0.004), then the Adam step from the same gradient.
    close(
        step(Box::new(|| Compile::new(AdamW::new(0.1)).loss("mse")), 1),
        1.0 - 0.1 * 0.004 - alpha * 0.2 / (0.004f64.sqrt() + 1e-7),
    );
    // RMSprop: v = 0.1·4 = 0.4, w = 1 - 0.1·2/√(0.4 + 1e-7)
    close(
        step(Box::new(|| Compile::new(RmsProp::new(0.1)).loss("mse")), 1),
        1.0 - 0.2 / (0.4f64 + 1e-7).sqrt(),
    );
    // clipvalue 0.5: w = 1 - 0.1·0.5
    close(
        step(
            Box::new(|| Compile::new(Sgd::new(0.1).clipvalue(0.5)).loss("mse")),
            1,
        ),
        0.95,
    );
    // clipnorm 1: gradient 2 rescaled to 1
    close(
        step(
            Box::new(|| Compile::new(Sgd::new(0.1).clipnorm(1.0)).loss("mse")),
            1,
        ),
        0.9,
    );
}

/// A layer that adds a loss while it runs (Keras' `self.add_loss` in `call`).
struct Penalized;

impl Layer for Penalized {
    fn kind(&self) -> &'static str {
        "penalized"
    }
    fn given_name(&self) -> Option<&str> {
        None
    }
    fn output_shape(&self, shapes: &[Vec<usize>]) -> kiln::Result<Vec<usize>> {
        Ok(shapes[0].clone())
    }
    fn call(&self, inputs: &[Tensor], ctx: &mut kiln::layers::CallContext) -> kiln::Result<Tensor> {
        ctx.add_loss("energy", (inputs[0].sqr()?.mean_all()? * 0.5)?);
        Ok(inputs[0].clone())
    }
}

#[test]
fn a_layer_can_add_a_loss_while_it_runs() {
    let x = Input::new([2]);
    let y = Penalized.apply(&x).unwrap();
    let y = Dense::new(1)
        .use_bias(false)
        .kernel_initializer(Initializer::Ones)
        .apply(&y)
        .unwrap();
    let mut m = Model::new(&[x], &[y]).unwrap();
    m.compile(Compile::new(Sgd::new(0.0)).loss("mse")).unwrap();
    let xs = Tensor::new(&[[1f32, 2.], [3., 0.]], &Device::Cpu).unwrap();
    let ys = Tensor::new(&[[0f32], [0.]], &Device::Cpu).unwrap();
    let logs = m.evaluate(&Dataset::new(xs, ys).unwrap(), 2).unwrap();
    // energy = 0.5 · mean(1, 4, 9, 0) = 1.75; mse = (9 + 9) / 2 = 9
    assert_eq!(logs.get("energy"), Some(1.75));
    assert_eq!(logs.get("loss"), Some(10.75));
}

#[test]
fn metrics_leave_masked_steps_out() {
    // Ids 0 are padding (mask_zero); the tagger predicts class argmax(embedding) per step.
    let x = Input::new([4]);
    let e = kiln::layers::Embedding::new(3, 2)
        .mask_zero(true)
        .with_name("emb")
        .apply(&x)
        .unwrap();
    let mut m = Model::new(&[x], &[e]).unwrap();
    // id 1 → class 0, id 2 → class 1 (id 0's row predicts class 1: wrong for label 0 below).
    m.weight("emb/embeddings")
        .unwrap()
        .var
        .set(&Tensor::new(&[[0f32, 1.], [1., 0.], [0., 1.]], &Device::Cpu).unwrap())
        .unwrap();
    m.compile(
        Compile::new(Sgd::new(0.0))
            .loss(scce())
            .metric(Accuracy::sparse().with_name("acc")),
    )
    .unwrap();
    let ids = Tensor::new(&[[1f32, 2., 0., 0.], [2., 2., 1., 0.]], &Device::Cpu).unwrap();
    // Real steps: predictions [0, 1] and [1, 1, 0]; labels make 4 of the 5 right. Padding labels are 0 (wrong).
    let labels = Tensor::new(&[[0f32, 1., 0., 0.], [1., 0., 0., 0.]], &Device::Cpu).unwrap();
    let logs = m.evaluate(&Dataset::new(ids, labels).unwrap(), 2).unwrap();
    assert_eq!(logs.get("acc"), Some(4.0 / 5.0));
}

#[test]
fn a_bad_initializer_is_an_error_not_a_panic() {
    let x = Input::new([3]);
    let y = Dense::new(2)
        .kernel_initializer(Initializer::RandomUniform { limit: f64::NAN })
        .apply(&x)
        .unwrap();
    let msg = Model::new(&[x], &[y])
        .expect_err("NaN limit must fail")
        .to_string();
    assert!(msg.contains("limit"), "{msg}");
}
