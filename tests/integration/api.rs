//! The library as a Rust user porting a Keras script meets it: what is reported, the errors a
//! mistake gives, and the Keras features a script uses.

use candle_core::{Device, Tensor};
use kiln::prelude::*;

fn points(n: usize) -> Dataset {
    let d = Device::Cpu;
    let x: Vec<f32> = (0..n * 3)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) / 5.0)
        .collect();
    let x = Tensor::from_vec(x, (n, 3), &d).unwrap();
    let y = (x.sum_keepdim(1).unwrap() * 0.5).unwrap();
    Dataset::new(x, y).unwrap()
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// A single-output model with an added term reports its data loss on its own, as
/// `<output>_loss` (the name Keras gives it in a multi-output model), in the history, in
/// `evaluate` and in the run folder's files; alone, the data loss is just `loss`, as in Keras.
#[test]
fn the_data_loss_is_its_own_term_beside_added_terms() {
    let x = Input::new([3]);
    let y = Dense::new(1)
        .with_name("out")
        .kernel_regularizer(L2::new(1e-2))
        .apply(&x)
        .unwrap();
    let mut model = Model::new(&[x], &[y]).unwrap();
    model
        .compile(Compile::new(Sgd::new(0.05)).loss("mse"))
        .unwrap();
    let data = points(40);
    let history = model
        .fit(
            &data,
            Fit::new()
                .epochs(2)
                .batch_size(8)
                .validation_split(0.25)
                .quiet(),
        )
        .unwrap();
    let keys: Vec<&str> = history.epochs[1].keys().collect();
    assert_eq!(
        keys,
        [
            "loss",
            "out_loss",
            "l2",
            "val_loss",
            "val_out_loss",
            "val_l2",
            "epoch_time_s"
        ]
    );
    // Exact values on fixed weights: the data term is the MSE, the penalty 1e-2·Σw².
    let logs = model.evaluate(&data, 40).unwrap();
    let pred = to_vec(&model.predict(&[data.inputs()[0].clone()], 40).unwrap()[0]);
    let target = to_vec(&data.targets()[0]);
    let mse: f64 = pred
        .iter()
        .zip(&target)
        .map(|(p, t)| f64::from(p - t).powi(2))
        .sum::<f64>()
        / 40.0;
    let kernel = to_vec(model.weight("out/kernel").unwrap().var.as_tensor());
    let l2: f64 = 1e-2 * kernel.iter().map(|w| f64::from(*w).powi(2)).sum::<f64>();
    let (out_loss, penalty, loss) = (
        logs.get("out_loss").unwrap(),
        logs.get("l2").unwrap(),
        logs.get("loss").unwrap(),
    );
    assert!((out_loss - mse).abs() < 1e-6, "{out_loss} vs {mse}");
    assert!((penalty - l2).abs() < 1e-7, "{penalty} vs {l2}");
    assert!((loss - (mse + l2)).abs() < 1e-6);

    // Without an added term the total has one part: `loss` alone, as Keras reports it.
    let x = Input::new([3]);
    let y = Dense::new(1).with_name("out").apply(&x).unwrap();
    let mut plain = Model::new(&[x], &[y]).unwrap();
    plain
        .compile(Compile::new(Sgd::new(0.05)).loss("mse"))
        .unwrap();
    let logs = plain.evaluate(&data, 40).unwrap();
    assert_eq!(logs.keys().collect::<Vec<_>>(), ["loss"]);
}

/// The adversarial term counts as a part too: FGSM training reports the clean data term.
#[test]
fn the_data_loss_is_reported_beside_an_adversarial_term() {
    let x = Input::new([3]);
    let y = Dense::new(1).with_name("out").apply(&x).unwrap();
    let mut model = Model::new(&[x], &[y]).unwrap();
    model
        .add_loss_term("adversarial", Adversarial::fgsm(0.1).multiplier(0.5))
        .unwrap();
    model
        .compile(Compile::new(Sgd::new(0.0)).loss("mse"))
        .unwrap();
    let data = points(16);
    let logs = model.train_on_batch(&data).unwrap();
    assert_eq!(
        logs.keys().collect::<Vec<_>>(),
        ["loss", "out_loss", "adversarial"]
    );
    let (loss, out, adv) = (
        logs.get("loss").unwrap(),
        logs.get("out_loss").unwrap(),
        logs.get("adversarial").unwrap(),
    );
    assert!((loss - out - adv).abs() < 1e-6);
    // The attack makes the loss larger: the adversarial term is half a larger loss.
    assert!(adv > 0.5 * out, "{adv} vs {out}");
}

/// A loss that averages over the batch axis returns `[features]`; with as many features as
/// samples that passes a shape check, and before the probe it trained a whole epoch. Now the
/// first batch catches it, and the message says what to change.
#[test]
fn a_loss_that_reduces_over_the_batch_is_caught_on_the_first_batch() {
    let x = Input::new([3]);
    let y = Dense::new(4).with_name("out").apply(&x).unwrap();
    let mut model = Model::new(&[x], &[y]).unwrap();
    let over_batch = loss_fn("batch_mean", |t: &Tensor, p: &Tensor| {
        Ok((p - t)?.sqr()?.mean(0)?)
    });
    model
        .compile(Compile::new(Sgd::new(0.1)).loss(over_batch))
        .unwrap();
    let d = Device::Cpu;
    let xs = Tensor::arange(0f32, 12., &d)
        .unwrap()
        .reshape((4, 3))
        .unwrap();
    let ys = Tensor::arange(0f32, 16., &d)
        .unwrap()
        .reshape((4, 4))
        .unwrap();
    let before = to_vec(model.weight("out/kernel").unwrap().var.as_tensor());
    let err = model
        .fit(
            &Dataset::new(xs, ys).unwrap(),
            Fit::new().batch_size(4).epochs(3).quiet(),
        )
        .unwrap_err();
    match &err {
        kiln::Error::LossContract(v) => {
            assert_eq!(v.problem, kiln::error::ContractProblem::MixesSamples);
            assert_eq!((v.loss.as_str(), v.output.as_str()), ("batch_mean", "out"));
            assert_eq!(v.got, [4]);
        }
        other => panic!("expected a contract violation, got {other}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("never over the batch axis 0"), "{msg}");
    // Caught before any update.
    assert_eq!(
        before,
        to_vec(model.weight("out/kernel").unwrap().var.as_tensor())
    );
}

/// Per-sample losses that legitimately look at the whole batch's labels (Circle's pairs) or
/// ignore samples (`ignore_class`) pass the probe: it checks that values follow their samples.
#[test]
fn built_in_losses_pass_the_probe() {
    let d = Device::Cpu;
    let x = Input::new([3]);
    let y = Dense::new(4).with_name("out").apply(&x).unwrap();
    let mut model = Model::new(&[x], &[y]).unwrap();
    model
        .compile(Compile::new(Sgd::new(0.1)).loss(kiln::losses::Circle::new()))
        .unwrap();
    let xs = Tensor::arange(0f32, 18., &d)
        .unwrap()
        .reshape((6, 3))
        .unwrap();
    let xs = (xs / 18.).unwrap();
    let labels = Tensor::new(&[0f32, 1., 0., 2., 1., 0.], &d).unwrap();
    let logs = model
        .evaluate(&Dataset::new(xs, labels).unwrap(), 6)
        .unwrap();
    assert!(logs.get("loss").unwrap().is_finite());
}

/// A shape error inside a loss says what the user did wrong, in their terms.
#[test]
fn targets_that_do_not_fit_the_output_are_told_in_the_users_terms() {
    let x = Input::new([3]);
    let y = Dense::new(1).with_name("out").apply(&x).unwrap();
    let mut model = Model::new(&[x], &[y]).unwrap();
    model
        .compile(Compile::new(Sgd::new(0.1)).loss("mse"))
        .unwrap();
    let d = Device::Cpu;
    let xs = Tensor::zeros((8, 3), candle_core::DType::F32, &d).unwrap();
    let ys = Tensor::zeros((8, 3), candle_core::DType::F32, &d).unwrap();
    let err = model
        .fit(&Dataset::new(xs, ys).unwrap(), Fit::new().quiet())
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, kiln::Error::LossShape(e)
            if e.loss == "mean_squared_error" && e.y_true == [8, 3] && e.y_pred == [8, 1]),
        "{msg}"
    );
    assert!(
        msg.contains("the targets have 3 columns but output `out` has 1 unit"),
        "{msg}"
    );
}

fn bits(model: &Model, name: &str) -> Vec<u32> {
    to_vec(model.weight(name).unwrap().var.as_tensor())
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// `add_loss` takes a closure without type annotations; what it returns must be a scalar, and
/// an error inside it keeps its kind on the way up.
#[test]
fn add_loss_closures_infer_their_types_and_must_return_a_scalar() {
    let x = Input::new([3]);
    let h = Dense::new(4).with_name("hidden").apply(&x).unwrap();
    let y = Dense::new(1).with_name("out").apply(&h).unwrap();
    let mut model = Model::new(&[&x], &[&y]).unwrap();
    model
        .add_loss("activity", move |t| {
            Ok((t.get(&h)?.sqr()?.mean_all()? * 0.1)?)
        })
        .unwrap();
    model
        .compile(Compile::new(Sgd::new(0.0)).loss("mse"))
        .unwrap();
    let data = points(8);
    let logs = model.evaluate(&data, 8).unwrap();
    let hidden = Model::new(&[&x], &[&model.layer_output("hidden").unwrap()])
        .unwrap()
        .predict(&[data.inputs()[0].clone()], 8)
        .unwrap();
    let expected = f64::from(to_vec(&hidden[0]).iter().map(|v| v * v).sum::<f32>()) / 32.0 * 0.1;
    let got = logs.get("activity").unwrap();
    assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");

    // A per-sample term (shape [8, 1]) is refused, naming the term and the shape.
    let mut model = Model::new(&[&x], &[&y]).unwrap();
    model
        .add_loss("per_sample", |t| Ok(t.output("out")?.sqr()?))
        .unwrap();
    model
        .compile(Compile::new(Sgd::new(0.0)).loss("mse"))
        .unwrap();
    let err = model.evaluate(&data, 8).unwrap_err();
    assert!(
        matches!(&err, kiln::Error::AddedLossShape { term, shape } if term == "per_sample" && shape == &[8, 1]),
        "{err}"
    );
    assert!(err.to_string().contains("not a scalar"), "{err}");

    // A graph error inside the closure stays a graph error (it arrived as InvalidArgument).
    let mut model = Model::new(&[&x], &[&y]).unwrap();
    model
        .add_loss("typo", |t| Ok(t.output("ouput")?.mean_all()?))
        .unwrap();
    model
        .compile(Compile::new(Sgd::new(0.0)).loss("mse"))
        .unwrap();
    let err = model.evaluate(&data, 8).unwrap_err();
    assert!(matches!(err, kiln::Error::Graph(_)), "{err:?}");
    assert!(err.to_string().contains("added loss `typo`"), "{err}");
}

/// Frozen layers stay bit-identical through `fit` with every optimizer, the fused Dense and
/// Adam kernels, L2 on the frozen kernel and BatchNormalization's moving statistics; the
/// trainable head moves, and unfreezing trains the base again.
#[test]
fn frozen_weights_stay_bit_identical_through_fit() {
    // Compile is Clone: each model gets its own copy, and so its own optimizer state.
    let optimizers = [
        ("adam", Compile::new(Adam::new(1e-2))),
        ("adamw", Compile::new(AdamW::new(1e-2).weight_decay(0.1))),
        ("sgd", Compile::new(Sgd::new(1e-2).momentum(0.9))),
        ("rmsprop", Compile::new(RmsProp::new(1e-2))),
    ];
    let data = points(64);
    for (what, compile) in optimizers {
        let x = Input::new([3]);
        let h = Dense::new(16)
            .with_name("base")
            .activation(Activation::Relu)
            .kernel_regularizer(L2::new(1e-2))
            .trainable(false)
            .apply(&x)
            .unwrap();
        let h = BatchNormalization::new().with_name("bn").apply(&h).unwrap();
        let y = Dense::new(1).with_name("head").apply(&h).unwrap();
        let mut model = Model::new(&[x], &[y]).unwrap();
        model.set_trainable("bn", false).unwrap();
        model.compile(compile.loss("mse")).unwrap();
        let frozen = [
            "base/kernel",
            "base/bias",
            "bn/gamma",
            "bn/beta",
            "bn/moving_mean",
            "bn/moving_variance",
        ];
        let before: Vec<Vec<u32>> = frozen.iter().map(|n| bits(&model, n)).collect();
        let head = bits(&model, "head/kernel");
        let history = model
            .fit(&data, Fit::new().epochs(3).batch_size(16).quiet())
            .unwrap();
        for (name, b) in frozen.iter().zip(&before) {
            assert_eq!(&bits(&model, name), b, "{what}: {name} moved");
        }
        assert_ne!(
            bits(&model, "head/kernel"),
            head,
            "{what}: the head did not train"
        );
        // A frozen weight's regularizer is no term (Keras counts trainable weights only).
        assert!(history.epochs[0].get("l2").is_none(), "{what}");

        model.set_trainable("base", true).unwrap();
        model
            .fit(&data, Fit::new().epochs(1).batch_size(16).quiet())
            .unwrap();
        assert_ne!(
            bits(&model, "base/kernel"),
            before[0],
            "{what}: unfrozen, base did not train"
        );
    }
}

/// A checkpoint records which layers were frozen, and restoring it freezes exactly those.
#[test]
fn checkpoints_keep_the_frozen_layers() {
    let build = || {
        let x = Input::new([3]);
        let h = Dense::new(4).with_name("base").apply(&x).unwrap();
        let y = Dense::new(1).with_name("head").apply(&h).unwrap();
        let mut m = Model::new(&[x], &[y]).unwrap();
        m.compile(Compile::new(Adam::new(1e-2)).loss("mse"))
            .unwrap();
        m
    };
    let dir = std::env::temp_dir().join(format!("kiln-api-frozen-{}", std::process::id()));
    let mut model = build();
    model.set_trainable("base", false).unwrap();
    let history = model
        .fit(&points(16), Fit::new().batch_size(8).quiet())
        .unwrap();
    model.save_checkpoint(&dir, "last", 1, &history).unwrap();
    let mut restored = build();
    assert!(restored.is_trainable("base").unwrap());
    restored.load_checkpoint(&dir, "last").unwrap();
    assert!(!restored.is_trainable("base").unwrap());
    assert!(restored.is_trainable("head").unwrap());
    assert_eq!(bits(&restored, "base/kernel"), bits(&model, "base/kernel"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Gradient accumulation: batches of 8 accumulated 3 at a time over 40 samples give the
/// updates of one batch of 24 and one of 16 (the uneven last group), with Adam (whose bias
/// correction counts updates, not batches) and an L2 penalty counted once per update.
#[test]
fn accumulated_batches_give_the_update_of_one_large_batch() {
    let build = || {
        let x = Input::new([3]);
        let h = Dense::new(4)
            .activation(Activation::Tanh)
            .kernel_regularizer(L2::new(0.05))
            .apply(&x)
            .unwrap();
        let y = Dense::new(1).with_name("out").apply(&h).unwrap();
        let mut m = Model::builder(&[x], &[y]).seed(3).build().unwrap();
        m.compile(Compile::new(Adam::new(0.05)).loss("mse"))
            .unwrap();
        m
    };
    let weights = |m: &Model| -> Vec<f32> {
        m.weights()
            .iter()
            .flat_map(|w| to_vec(w.var.as_tensor()))
            .collect()
    };
    let data = points(40);
    let mut accumulated = build();
    let fit = Fit::new().batch_size(8).shuffle(false).epochs(2).quiet();
    let history = accumulated
        .fit(&data, fit.clone().gradient_accumulation_steps(3))
        .unwrap();
    let mut large = build();
    for _ in 0..2 {
        large.train_on_batch(&data.slice(0, 24).unwrap()).unwrap();
        large.train_on_batch(&data.slice(24, 16).unwrap()).unwrap();
    }
    let (a, b) = (weights(&accumulated), weights(&large));
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        worst < 1e-5,
        "accumulated and large-batch weights differ by {worst}"
    );
    // Not trivially equal: without accumulation, five updates an epoch land elsewhere.
    let mut plain = build();
    plain.fit(&data, fit).unwrap();
    let apart = weights(&plain)
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(apart > 1e-2, "{apart}");
    // The logs stay per batch: the epoch's loss is the mean over its samples.
    assert!(history.epochs[1].get("out_loss").is_some());
    assert!(accumulated
        .fit(&data, Fit::new().gradient_accumulation_steps(0).quiet())
        .unwrap_err()
        .to_string()
        .contains("gradient_accumulation_steps"));
}

/// The common traits a Rust user reaches for: a loss and a compile configuration can be cloned
/// and reused, and models, losses, compile configurations print something readable.
#[test]
fn losses_compile_and_models_are_clone_and_debug() {
    fn clone_debug<T: Clone + std::fmt::Debug>(_: &T) {}
    let scale = 2.0;
    let mine = loss_fn("scaled_mse", move |t: &Tensor, p: &Tensor| {
        Ok(((p - t)?.sqr()?.mean(candle_core::D::Minus1)? * scale)?)
    });
    clone_debug(&mine);
    assert_eq!(
        format!("{mine:?}"),
        "LossFn { name: \"scaled_mse\", reduction: SumOverBatchSize, .. }"
    );
    let compile = Compile::new(Adam::new(1e-2)).loss(mine.clone());
    clone_debug(&compile);
    assert!(format!("{compile:?}").contains("scaled_mse"), "{compile:?}");
    // One Compile, two models; each gets its own optimizer state.
    let data = points(16);
    let mut trained = Vec::new();
    for _ in 0..2 {
        let x = Input::new([3]);
        let y = Dense::new(1).with_name("out").apply(&x).unwrap();
        let mut m = Model::new(&[x], &[y]).unwrap();
        m.compile(compile.clone()).unwrap();
        m.fit(&data, Fit::new().epochs(2).batch_size(4).quiet())
            .unwrap();
        trained.push(bits(&m, "out/kernel"));
        let shown = format!("{m:?}");
        assert!(
            shown.contains("\"out\"") && shown.contains("compiled: true"),
            "{shown}"
        );
    }
    assert_eq!(trained[0], trained[1]);
    // The paths of checkpoints and data files take anything path-like.
    let dir = std::env::temp_dir().join(format!("kiln-api-paths-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("p.csv"), "a,b\n1,2\n3,4\n").unwrap();
    let table = kiln::data::load_csv_features(dir.join("p.csv"), &Device::Cpu).unwrap();
    assert_eq!(table.dims(), &[2, 2]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Keras' `fit(sample_weight={"label": w})`: a weight for one output reaches that output's
/// loss (and weighted metrics) only; the other output's loss is unweighted.
#[test]
fn sample_weights_per_output_reach_their_own_output_only() {
    let d = Device::Cpu;
    let x = Input::new([1]);
    let ones = |name: &str| {
        Dense::new(1)
            .use_bias(false)
            .kernel_initializer(Initializer::Ones)
            .with_name(name)
    };
    let a = ones("a").apply(&x).unwrap();
    let b = ones("b").apply(&x).unwrap();
    let mut m = Model::new(&[x], &[a, b]).unwrap();
    m.compile(
        Compile::new(Sgd::new(0.1))
            .loss("mse")
            .weighted_metric_for("b", "mse"),
    )
    .unwrap();
    // Predictions equal the inputs: errors 1, 2, 3 (a: targets 0) and 1, 1, 1 (b: targets x - 1).
    let xs = Tensor::new(&[[1f32], [2.], [3.]], &d).unwrap();
    let zeros = xs.zeros_like().unwrap();
    let shifted = (&xs - 1.0).unwrap();
    let w = Tensor::new(&[0f32, 1., 3.], &d).unwrap();
    let data = Dataset::multi(vec![xs.clone()], vec![zeros.clone(), shifted.clone()])
        .unwrap()
        .with_output_sample_weights(vec![None, Some(w.clone())])
        .unwrap();
    let logs = m.evaluate(&data, 3).unwrap();
    // a: (1 + 4 + 9) / 3; b: Keras' sum_over_batch_size, (0·1 + 1·1 + 3·1) / 3.
    assert!((logs.get("a_loss").unwrap() - 14.0 / 3.0).abs() < 1e-6);
    assert!((logs.get("b_loss").unwrap() - 4.0 / 3.0).abs() < 1e-6);
    // The weighted metric is the weighted mean: (0 + 1 + 3) / (0 + 1 + 3).
    assert!((logs.get("b_mse").unwrap() - 1.0).abs() < 1e-6);
    // The same weight for every output changes both.
    let shared = Dataset::multi(vec![xs.clone()], vec![zeros.clone(), shifted.clone()])
        .unwrap()
        .with_sample_weight(w.clone())
        .unwrap();
    let both = m.evaluate(&shared, 3).unwrap();
    assert!((both.get("a_loss").unwrap() - (4.0 + 27.0) / 3.0).abs() < 1e-5);
    // Mistakes say what to give.
    let two = || Dataset::multi(vec![xs.clone()], vec![zeros.clone(), shifted.clone()]).unwrap();
    let e = two()
        .with_output_sample_weights(vec![Some(w.clone())])
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 entries for 2 targets"), "{e}");
    let e = two()
        .with_sample_weight(w.clone())
        .unwrap()
        .with_output_sample_weights(vec![None, Some(w.clone())])
        .unwrap_err()
        .to_string();
    assert!(e.contains("not both"), "{e}");
    let short = Tensor::new(&[1f32, 2.], &d).unwrap();
    let e = two()
        .with_output_sample_weights(vec![None, Some(short)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("the sample weight of output 1"), "{e}");
}

/// Keras' custom step: `tape.gradient` then `optimizer.apply_gradients`. `gradients` followed by
/// `apply_gradients` is the step `train_on_batch` takes (the optimizer's clipping, its step
/// counter for Adam's bias correction), and mistakes name the weight.
#[test]
fn apply_gradients_takes_the_step_fit_takes() {
    let build = || {
        let x = Input::new([3]);
        let h = Dense::new(4)
            .activation(Activation::Tanh)
            .with_name("h")
            .apply(&x)
            .unwrap();
        let y = Dense::new(1).with_name("out").apply(&h).unwrap();
        let mut m = Model::new(&[x], &[y]).unwrap();
        m.compile(Compile::new(Adam::new(0.05).global_clipnorm(0.5)).loss("mse"))
            .unwrap();
        m
    };
    let data = points(16);
    let mut fitted = build();
    let mut manual = build();
    for _ in 0..3 {
        fitted.train_on_batch(&data).unwrap();
        let g = manual.gradients(&data).unwrap();
        manual.apply_gradients(&g.weights).unwrap();
    }
    for (a, b) in fitted
        .get_weights()
        .unwrap()
        .iter()
        .zip(manual.get_weights().unwrap())
    {
        for (p, q) in to_vec(a).iter().zip(to_vec(&b)) {
            assert!((p - q).abs() < 1e-6, "{p} vs {q}");
        }
    }
    let g = manual.gradients(&data).unwrap();
    manual.set_trainable("h", false).unwrap();
    let e = manual.apply_gradients(&g.weights).unwrap_err().to_string();
    assert!(e.contains("`h/kernel`") && e.contains("frozen"), "{e}");
    let e = manual
        .apply_gradients(&[("nope/kernel".to_string(), g.weights[0].1.clone())])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`nope/kernel`") && e.contains("out/kernel"),
        "{e}"
    );
    let twice = vec![g.weights[2].clone(), g.weights[2].clone()];
    let e = manual.apply_gradients(&twice).unwrap_err().to_string();
    assert!(e.contains("two gradients"), "{e}");
    let e = manual
        .apply_gradients(&[(g.weights[2].0.clone(), g.weights[3].1.clone())])
        .unwrap_err()
        .to_string();
    assert!(e.contains("has shape [1], the weight [4, 1]"), "{e}");
    let mut uncompiled = Sequential::new([3]).add(Dense::new(1)).build().unwrap();
    let e = uncompiled.apply_gradients(&[]).unwrap_err().to_string();
    assert!(e.contains("not compiled"), "{e}");
}

/// A user depends on kiln alone: the library's doc examples and the examples/ programs reach
/// candle through `kiln::candle` or the prelude, never `candle_core`, which is not in the
/// user's Cargo.toml (copying such a line failed with E0433 "use of undeclared crate").
#[test]
fn docs_and_examples_never_name_candle_core() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    let mut dirs = vec![root.join("crates/kiln/src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            match path.is_dir() {
                true => dirs.push(path),
                false if path.extension().is_some_and(|e| e == "rs") => files.push(path),
                false => {}
            }
        }
    }
    let mut found = Vec::new();
    for path in &files {
        for (i, line) in std::fs::read_to_string(path).unwrap().lines().enumerate() {
            let doc = line.trim_start().starts_with("///") || line.trim_start().starts_with("//!");
            if doc && line.contains("candle_core") {
                found.push(format!("{}:{}", path.display(), i + 1));
            }
        }
    }
    for entry in std::fs::read_dir(root.join("examples")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        if text.contains("candle_core") {
            found.push(path.display().to_string());
        }
    }
    assert!(
        found.is_empty(),
        "doc examples naming candle_core: {found:?}"
    );
    assert!(files.len() > 50);
}

/// One naming convention (Rust API guidelines C-GETTER, C-BUILDER): every builder that names
/// its thing takes `.with_name(…)`, and `name()` is the getter, on layers, losses and metrics
/// alike. The names given reach the model and the logs.
#[test]
fn layers_losses_and_metrics_are_named_with_with_name() {
    let x = Input::new([3]);
    let y = Dense::new(1).with_name("price").apply(&x).unwrap();
    let mut m = Model::new(&[x], &[y]).unwrap();
    let loss = MeanSquaredError::new().with_name("sq");
    let metric = RootMeanSquaredError::new().with_name("abs_err");
    assert_eq!(
        (Loss::name(&loss), kiln::metrics::Metric::name(&metric)),
        ("sq", "abs_err")
    );
    m.compile(Compile::new(Sgd::new(0.01)).loss(loss).metric(metric))
        .unwrap();
    assert_eq!(m.output_names(), ["price"]);
    let logs = m.evaluate(&points(8), 8).unwrap();
    assert!(logs.get("abs_err").is_some(), "{logs:?}");
}

/// One-hot targets given to sparse categorical crossentropy, the usual Keras mix-up: the error
/// names the shapes and the loss to use instead.
#[test]
fn one_hot_targets_to_a_sparse_loss_are_pointed_to_categorical_crossentropy() {
    let x = Input::new([4]);
    let y = Dense::new(3).apply(&x).unwrap();
    let mut m = Model::new(&[x], &[y]).unwrap();
    m.compile(
        Compile::new(Adam::new(1e-3)).loss(SparseCategoricalCrossentropy::new().from_logits(true)),
    )
    .unwrap();
    let xs = Tensor::zeros((6, 4), DType::F32, &Device::Cpu).unwrap();
    let one_hot = Tensor::zeros((6, 3), DType::F32, &Device::Cpu).unwrap();
    let e = m
        .fit(&Dataset::new(xs, one_hot).unwrap(), Fit::new().quiet())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("labels of shape [6, 3]") && e.contains("use categorical_crossentropy"),
        "{e}"
    );
}
