//! A built model used as a layer of another (Keras' `y = encoder(x)`): the same values and
//! gradients as its layers built flat, one weight set however often it is applied, Keras'
//! nested names, freezing as a whole, its added terms once per application, masks and the
//! training flag passed in, saving and loading, and errors that name the model.

use crate::support::temp;
use candle_core::{DType, Device, Tensor};
use kiln::prelude::*;

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn bits(model: &Model, name: &str) -> Vec<u32> {
    to_vec(model.weight(name).unwrap().var.as_tensor())
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

fn close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}");
    for (x, y) in to_vec(a).iter().zip(to_vec(b)) {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{what}: {x} vs {y}");
    }
}

/// `n` samples of `width` features, varied and deterministic.
fn features(n: usize, width: usize, salt: usize) -> Tensor {
    let v: Vec<f32> = (0..n * width)
        .map(|i| (((i + salt) * 7919 % 23) as f32 - 11.0) / 7.0)
        .collect();
    Tensor::from_vec(v, (n, width), &Device::Cpu).unwrap()
}

fn encoder(seed: u64) -> Model {
    let x = Input::new([5]);
    let h = Dense::new(4)
        .activation(Activation::Relu)
        .apply(&x)
        .unwrap();
    let h = Dense::new(3)
        .activation(Activation::Tanh)
        .apply(&h)
        .unwrap();
    Model::builder(&[x], &[h])
        .name("encoder")
        .seed(seed)
        .build()
        .unwrap()
}

/// A nested encoder gives the predictions and gradients of the same layers built flat with
/// the same weights, and lists its weights under Keras' nested paths.
#[test]
fn a_nested_model_computes_what_its_layers_built_flat_compute() {
    let enc = encoder(3);
    let x = Input::new([5]);
    let y = Dense::new(2)
        .with_name("head")
        .apply(&enc.apply(&x).unwrap())
        .unwrap();
    let mut nested = Model::new(&[x], &[y]).unwrap();
    let names: Vec<String> = nested.weights().into_iter().map(|w| w.name).collect();
    assert_eq!(
        names,
        [
            "encoder/dense/kernel",
            "encoder/dense/bias",
            "encoder/dense_1/kernel",
            "encoder/dense_1/bias",
            "head/kernel",
            "head/bias"
        ]
    );
    assert_eq!(
        nested.layer_names(),
        ["encoder/dense", "encoder/dense_1", "head"]
    );

    let x = Input::new([5]);
    let h = Dense::new(4)
        .activation(Activation::Relu)
        .apply(&x)
        .unwrap();
    let h = Dense::new(3)
        .activation(Activation::Tanh)
        .apply(&h)
        .unwrap();
    let y = Dense::new(2).with_name("head").apply(&h).unwrap();
    let mut flat = Model::builder(&[x], &[y]).seed(99).build().unwrap();
    flat.set_weights(&nested.get_weights().unwrap()).unwrap();

    let xs = features(12, 5, 1);
    let (a, b) = (
        nested.predict(std::slice::from_ref(&xs), 5).unwrap(),
        flat.predict(std::slice::from_ref(&xs), 5).unwrap(),
    );
    close(&a[0], &b[0], 1e-6, "predict");
    // Not a trivial output: the head's values vary.
    assert!(to_vec(&a[0]).iter().any(|v| v.abs() > 1e-3));

    let targets = features(12, 2, 5);
    let data = Dataset::new(xs, targets).unwrap();
    nested
        .compile(Compile::new(Sgd::new(0.1)).loss("mse"))
        .unwrap();
    flat.compile(Compile::new(Sgd::new(0.1)).loss("mse"))
        .unwrap();
    let (gn, gf) = (
        nested.gradients(&data).unwrap(),
        flat.gradients(&data).unwrap(),
    );
    for ((n_name, n_grad), (f_name, f_grad)) in gn.weights.iter().zip(&gf.weights) {
        assert_eq!(n_name.trim_start_matches("encoder/"), f_name);
        close(n_grad, f_grad, 1e-6, n_name);
    }
    assert!(to_vec(gn.weight("encoder/dense/kernel").unwrap())
        .iter()
        .any(|v| v.abs() > 1e-4));
}

/// Applied twice, the encoder has one weight set: its gradient is the sum over both
/// applications (the gradient of a shared flat layer), and one update moves the encoder
/// everywhere it is used, the encoder model itself included.
#[test]
fn two_applications_share_one_weight_set() {
    let enc = encoder(4);
    let (a, b) = (Input::named("a", [5]), Input::named("b", [5]));
    let (ea, eb) = (enc.apply(&a).unwrap(), enc.apply(&b).unwrap());
    let y = Dense::new(1)
        .with_name("head")
        .apply(&Concatenate::new().apply_many(&[&ea, &eb]).unwrap())
        .unwrap();
    let mut siamese = Model::new(&[a, b], &[y]).unwrap();
    assert_eq!(siamese.weights().len(), 6);

    // The same network with shared flat layers.
    let (a, b) = (Input::named("a", [5]), Input::named("b", [5]));
    let (d1, d2) = (
        Dense::new(4).activation(Activation::Relu).shared(),
        Dense::new(3).activation(Activation::Tanh).shared(),
    );
    let fa = d2.apply(&d1.apply(&a).unwrap()).unwrap();
    let fb = d2.apply(&d1.apply(&b).unwrap()).unwrap();
    let y = Dense::new(1)
        .with_name("head")
        .apply(&Concatenate::new().apply_many(&[&fa, &fb]).unwrap())
        .unwrap();
    let mut flat = Model::builder(&[a, b], &[y]).seed(7).build().unwrap();
    flat.set_weights(&siamese.get_weights().unwrap()).unwrap();

    let (xa, xb) = (features(10, 5, 2), features(10, 5, 9));
    let data = Dataset::multi(vec![xa.clone(), xb.clone()], vec![features(10, 1, 4)]).unwrap();
    for m in [&mut siamese, &mut flat] {
        m.compile(Compile::new(Sgd::new(0.5)).loss("mse")).unwrap();
    }
    let (gs, gf) = (
        siamese.gradients(&data).unwrap(),
        flat.gradients(&data).unwrap(),
    );
    for ((name, g), (_, f)) in gs.weights.iter().zip(&gf.weights) {
        close(g, f, 1e-6, name);
    }

    let before = enc.predict(std::slice::from_ref(&xa), 10).unwrap();
    let kernel = bits(&enc, "dense/kernel");
    siamese
        .fit(&data, Fit::new().epochs(1).batch_size(10).quiet())
        .unwrap();
    flat.fit(&data, Fit::new().epochs(1).batch_size(10).quiet())
        .unwrap();
    // The encoder model's own weights moved, by exactly the shared flat layer's update.
    assert_ne!(bits(&enc, "dense/kernel"), kernel);
    assert_eq!(
        bits(&enc, "dense/kernel"),
        bits(&siamese, "encoder/dense/kernel")
    );
    close(
        enc.weight("dense/kernel").unwrap().var.as_tensor(),
        flat.weights()[0].var.as_tensor(),
        1e-6,
        "updated kernel",
    );
    let after = enc.predict(&[xa], 10).unwrap();
    assert!(to_vec(&before[0]) != to_vec(&after[0]));
}

/// Freezing the nested model freezes all its layers: its weights (and its BatchNormalization's
/// moving statistics) stay bit-identical through `fit` while the head trains; the summary shows
/// it as one row with its parameter counts, as Keras does.
#[test]
fn a_frozen_nested_model_stays_bit_identical_and_is_one_summary_row() {
    let x = Input::new([5]);
    let h = Dense::new(4).apply(&x).unwrap();
    let h = BatchNormalization::new().apply(&h).unwrap();
    let tower = Model::builder(&[x], &[h]).name("tower").build().unwrap();
    let x = Input::new([5]);
    let y = Dense::new(1)
        .with_name("head")
        .apply(&tower.apply(&x).unwrap())
        .unwrap();
    let mut model = Model::new(&[x], &[y]).unwrap();

    let table = model.summary();
    assert!(table.contains("tower (Functional)"), "{table}");
    assert!(!table.contains("tower/dense"), "{table}");
    // 5·4 + 4 (dense) + 4·4 (batch normalization) = 40 parameters in one row.
    let row = table.lines().find(|l| l.contains("tower (")).unwrap();
    assert!(row.contains("(None, 4)") && row.contains(" 40 "), "{row}");
    assert!(table.contains("Total params: 45"), "{table}");
    assert!(table.contains("Trainable params: 37"), "{table}");

    model.set_trainable("tower", false).unwrap();
    assert!(!model.is_trainable("tower").unwrap());
    let table = model.summary();
    assert!(table.contains("Trainable params: 5 "), "{table}");
    assert!(table.contains("Non-trainable params: 40 "), "{table}");

    model
        .compile(Compile::new(Adam::new(0.05)).loss("mse"))
        .unwrap();
    let frozen: Vec<String> = model
        .weights()
        .into_iter()
        .map(|w| w.name)
        .filter(|n| n.starts_with("tower/"))
        .collect();
    assert_eq!(frozen.len(), 6);
    let before: Vec<Vec<u32>> = frozen.iter().map(|n| bits(&model, n)).collect();
    let head = bits(&model, "head/kernel");
    let data = Dataset::new(features(32, 5, 3), features(32, 1, 8)).unwrap();
    model
        .fit(&data, Fit::new().epochs(2).batch_size(8).quiet())
        .unwrap();
    for (name, b) in frozen.iter().zip(&before) {
        assert_eq!(&bits(&model, name), b, "{name} moved");
    }
    assert_ne!(bits(&model, "head/kernel"), head);

    // Unfrozen, it trains, and its BatchNormalization, reached by the training flag, updates
    // its moving mean.
    tower.set_all_trainable(true);
    model
        .fit(&data, Fit::new().epochs(1).batch_size(8).quiet())
        .unwrap();
    assert_ne!(bits(&model, "tower/dense/kernel"), before[0]);
    let mean = frozen
        .iter()
        .position(|n| n.ends_with("moving_mean"))
        .unwrap();
    assert_ne!(bits(&model, &frozen[mean]), before[mean]);
}

/// The nested model's `add_loss` term and activity regularizer count once per application,
/// the `add_loss` term reported as `<model>/<term>`, with the values computed by hand.
#[test]
fn a_nested_models_added_terms_count_once_per_application() {
    let x = Input::new([5]);
    let h = Dense::new(3)
        .activity_regularizer(L2::new(0.01))
        .apply(&x)
        .unwrap();
    let mut enc = Model::builder(&[&x], &[&h]).name("enc").build().unwrap();
    let hidden = h.clone();
    enc.add_loss("sparsity", move |t| {
        Ok((t.get(&hidden)?.abs()?.mean_all()? * 0.1)?)
    })
    .unwrap();
    // A term over a weight, found by its name in the nested model, and one over its output.
    enc.add_loss("kernel_l1", |t| {
        Ok((t.weight("dense/kernel")?.abs()?.sum_all()? * 0.01)?)
    })
    .unwrap();
    enc.add_loss("out_mean", |t| Ok(t.output("dense")?.mean_all()?))
        .unwrap();

    let (a, b) = (Input::named("a", [5]), Input::named("b", [5]));
    let (ea, eb) = (enc.apply(&a).unwrap(), enc.apply(&b).unwrap());
    let y = Add::new().apply_many(&[&ea, &eb]).unwrap();
    let mut model = Model::new(&[a, b], &[y]).unwrap();
    model
        .compile(Compile::new(Sgd::new(0.0)).loss("mse"))
        .unwrap();
    let (xa, xb) = (features(6, 5, 1), features(6, 5, 13));
    let data = Dataset::multi(vec![xa.clone(), xb.clone()], vec![features(6, 3, 2)]).unwrap();
    let logs = model.evaluate(&data, 6).unwrap();

    let (ha, hb) = (
        enc.predict(&[xa], 6).unwrap().remove(0),
        enc.predict(&[xb], 6).unwrap().remove(0),
    );
    let mean_abs = |t: &Tensor| to_vec(t).iter().map(|v| v.abs()).sum::<f32>() / 18.0;
    let activity = |t: &Tensor| 0.01 * to_vec(t).iter().map(|v| v * v).sum::<f32>() / 6.0;
    let sparsity = 0.1 * (mean_abs(&ha) + mean_abs(&hb));
    let l2 = activity(&ha) + activity(&hb);
    let got = logs.get("enc/sparsity").unwrap() as f32;
    assert!((got - sparsity).abs() < 1e-5, "{got} vs {sparsity}");
    let got = logs.get("activity_l2").unwrap() as f32;
    assert!((got - l2).abs() < 1e-5, "{got} vs {l2}");
    let kernel: f32 = to_vec(enc.weight("dense/kernel").unwrap().var.as_tensor())
        .iter()
        .map(|v| v.abs())
        .sum();
    let got = logs.get("enc/kernel_l1").unwrap() as f32;
    assert!(
        (got - 2.0 * 0.01 * kernel).abs() < 1e-5,
        "{got} vs {kernel}"
    );
    let means = (to_vec(&ha).iter().sum::<f32>() + to_vec(&hb).iter().sum::<f32>()) / 18.0;
    let got = logs.get("enc/out_mean").unwrap() as f32;
    assert!((got - means).abs() < 1e-5, "{got} vs {means}");
    let data_loss = logs.get("add_loss").unwrap() as f32;
    let total = logs.get("loss").unwrap() as f32;
    let terms = data_loss + sparsity + l2 + 2.0 * 0.01 * kernel + means;
    assert!((total - terms).abs() < 1e-4, "{total} vs {terms}");
}

/// A mask made outside the nested model reaches its LSTM, and the training flag its Dropout:
/// the same values as the layers built flat.
#[test]
fn masks_and_the_training_flag_reach_the_nested_layers() {
    let steps = Input::new([4, 2]);
    let h = Lstm::new(3).apply(&steps).unwrap();
    let h = Dropout::new(0.5).apply(&h).unwrap();
    let reader = Model::builder(&[steps], &[h])
        .name("reader")
        .build()
        .unwrap();
    let ids = Input::new([4]);
    let e = Embedding::new(6, 2).mask_zero(true).apply(&ids).unwrap();
    let y = reader.apply(&e).unwrap();
    let nested = Model::new(&[ids], &[y]).unwrap();

    let ids = Input::new([4]);
    let e = Embedding::new(6, 2).mask_zero(true).apply(&ids).unwrap();
    let h = Lstm::new(3).apply(&e).unwrap();
    let h = Dropout::new(0.5).apply(&h).unwrap();
    let flat = Model::builder(&[ids], &[h]).seed(5).build().unwrap();
    flat.set_weights(&nested.get_weights().unwrap()).unwrap();

    // Trailing padding (0) in some rows: with the mask, the LSTM stops at the last real step.
    let tokens = Tensor::new(
        &[[1f32, 2., 3., 4.], [5., 1., 0., 0.], [2., 0., 0., 0.]],
        &Device::Cpu,
    )
    .unwrap();
    let (a, b) = (
        nested.predict(std::slice::from_ref(&tokens), 3).unwrap(),
        flat.predict(std::slice::from_ref(&tokens), 3).unwrap(),
    );
    close(&a[0], &b[0], 1e-6, "masked predict");
    // Unmasked, the padded rows would differ: the mask matters here.
    let table = nested.weight("embedding/embeddings").unwrap();
    let idx = tokens.to_dtype(DType::U32).unwrap().flatten_all().unwrap();
    let vectors = table
        .var
        .as_tensor()
        .index_select(&idx, 0)
        .unwrap()
        .reshape((3, 4, 2))
        .unwrap();
    let unmasked = reader.predict(&[vectors], 3).unwrap();
    assert!(to_vec(&unmasked[0])[3..] != to_vec(&a[0])[3..]);

    let infer = nested.call(std::slice::from_ref(&tokens), false).unwrap();
    close(&infer[0], &a[0], 1e-6, "inference call");
    let train = nested.call(&[tokens], true).unwrap();
    let zeros = to_vec(&train[0]).iter().filter(|v| **v == 0.0).count();
    assert!(zeros > 0, "dropout did not run in training mode");
}

/// Weights files and checkpoints of a model with a nested one round-trip.
#[test]
fn weights_and_checkpoints_of_a_nested_model_round_trip() {
    let build = |seed: u64| {
        let enc = encoder(seed);
        let x = Input::new([5]);
        let y = Dense::new(2)
            .with_name("head")
            .apply(&enc.apply(&x).unwrap())
            .unwrap();
        let mut m = Model::builder(&[x], &[y]).seed(seed).build().unwrap();
        m.compile(Compile::new(Adam::new(0.01)).loss("mse"))
            .unwrap();
        m
    };
    let mut trained = build(1);
    let data = Dataset::new(features(16, 5, 0), features(16, 2, 3)).unwrap();
    let history = trained
        .fit(&data, Fit::new().epochs(2).batch_size(8).quiet())
        .unwrap();
    let dir = temp("nested", "round-trip");
    let file = dir.join("model.safetensors");
    trained.save_weights(&file).unwrap();
    trained.save_checkpoint(&dir, "ckpt", 2, &history).unwrap();
    let xs = features(7, 5, 11);
    let want = trained.predict(std::slice::from_ref(&xs), 7).unwrap();

    let fresh = build(2);
    assert!(to_vec(&fresh.predict(std::slice::from_ref(&xs), 7).unwrap()[0]) != to_vec(&want[0]));
    fresh.load_weights(&file).unwrap();
    assert_eq!(
        to_vec(&fresh.predict(std::slice::from_ref(&xs), 7).unwrap()[0]),
        to_vec(&want[0])
    );
    let mut resumed = build(3);
    resumed.load_checkpoint(&dir, "ckpt").unwrap();
    assert_eq!(
        to_vec(&resumed.predict(&[xs], 7).unwrap()[0]),
        to_vec(&want[0])
    );
    // Training on from the checkpoint is the training the original continues with.
    trained
        .fit(&data, Fit::new().epochs(1).batch_size(8).quiet())
        .unwrap();
    resumed
        .fit(&data, Fit::new().epochs(1).batch_size(8).quiet())
        .unwrap();
    assert_eq!(
        bits(&trained, "encoder/dense/kernel"),
        bits(&resumed, "encoder/dense/kernel")
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A model nested in a nested model: names chain, and values equal the flat layers'.
#[test]
fn models_nest_in_nested_models() {
    let inner = encoder(8);
    let x = Input::new([5]);
    let h = Dense::new(2).apply(&inner.apply(&x).unwrap()).unwrap();
    let middle = Model::builder(&[x], &[h]).name("middle").build().unwrap();
    let x = Input::new([5]);
    let y = middle.apply(&x).unwrap();
    let outer = Model::new(&[&x], &[&y]).unwrap();
    let names: Vec<String> = outer.weights().into_iter().map(|w| w.name).collect();
    assert_eq!(
        names,
        [
            "middle/encoder/dense/kernel",
            "middle/encoder/dense/bias",
            "middle/encoder/dense_1/kernel",
            "middle/encoder/dense_1/bias",
            "middle/dense/kernel",
            "middle/dense/bias"
        ]
    );
    // An output a nested model makes is named by the model, as Keras' `output_names`.
    assert_eq!(outer.output_names(), ["middle"]);
    let xs = features(4, 5, 6);
    assert_eq!(
        to_vec(&outer.predict(std::slice::from_ref(&xs), 4).unwrap()[0]),
        to_vec(&middle.predict(&[xs], 4).unwrap()[0])
    );
    assert!(outer.summary().contains("middle (Functional)"));
}

/// Applying a model to the wrong count or shapes of tensors names the model and the shapes;
/// a model of several outputs applied as one is told to use apply_many.
#[test]
fn applying_a_model_wrongly_names_the_model_and_the_shapes() {
    let enc = encoder(0);
    let err = enc.apply(&Input::new([6])).unwrap_err();
    assert!(matches!(err, kiln::Error::Graph(_)));
    let msg = err.to_string();
    assert!(
        msg.contains("model `encoder`") && msg.contains("[[5]]") && msg.contains("[[6]]"),
        "{msg}"
    );
    let (p, q) = (Input::new([5]), Input::new([5]));
    let msg = enc.apply_many(&[&p, &q]).unwrap_err().to_string();
    assert!(
        msg.contains("takes 1 input(s)") && msg.contains("2 tensor(s)"),
        "{msg}"
    );

    let x = Input::new([2]);
    let two = Model::new(&[&x], &[&Dense::new(1).apply(&x).unwrap(), &x]).unwrap();
    let msg = two.apply(&Input::new([2])).unwrap_err().to_string();
    assert!(
        msg.contains("2 outputs") && msg.contains("apply_many"),
        "{msg}"
    );

    // Two different models given the same name cannot sit in one model.
    let (a, b) = (encoder(1), encoder(2));
    let x = Input::new([5]);
    let y = Add::new()
        .apply_many(&[&a.apply(&x).unwrap(), &b.apply(&x).unwrap()])
        .unwrap();
    let msg = Model::new(&[x], &[y]).unwrap_err().to_string();
    assert!(msg.contains("two layers are named `encoder`"), "{msg}");
}

/// A reader model: a Dense (which passes a mask on) into an LSTM with return_sequences (which
/// reads it and passes it on), and the same two layers built flat in another graph.
fn reader(seed: u64) -> Model {
    let steps = Input::new([6, 3]);
    let h = Dense::new(4)
        .activation(Activation::Tanh)
        .apply(&steps)
        .unwrap();
    let h = Lstm::new(3).return_sequences(true).apply(&h).unwrap();
    Model::builder(&[steps], &[h])
        .name("reader")
        .seed(seed)
        .build()
        .unwrap()
}

/// The heads both the nested and the flat model put on the reader's output: a per-step Dense
/// (the reader's mask reaches its loss) and a masked mean over the steps.
fn masked_heads(h: &SymbolicTensor) -> (SymbolicTensor, SymbolicTensor) {
    let per_step = Dense::new(2).with_name("per_step").apply(h).unwrap();
    let mean = GlobalAveragePooling1D::new().apply(h).unwrap();
    (
        per_step,
        Dense::new(1).with_name("pooled").apply(&mean).unwrap(),
    )
}

/// Masks keeping prefixes, steps with holes and every step, for 5 samples of 6 steps.
fn keep_masks() -> Vec<Tensor> {
    let rows: [[[f32; 6]; 5]; 3] = [
        [
            [1., 1., 1., 1., 0., 0.],
            [1., 1., 0., 0., 0., 0.],
            [1., 1., 1., 1., 1., 1.],
            [1., 0., 0., 0., 0., 0.],
            [1., 1., 1., 0., 0., 0.],
        ],
        [
            [1., 0., 1., 0., 1., 0.],
            [0., 1., 1., 0., 0., 1.],
            [0., 0., 0., 0., 0., 1.],
            [1., 1., 0., 1., 1., 0.],
            [0., 1., 0., 1., 0., 1.],
        ],
        [[1.; 6]; 5],
    ];
    rows.iter()
        .map(|r| Tensor::new(r, &Device::Cpu).unwrap())
        .collect()
}

/// An explicit mask given to a nested model's application (Keras' `reader(x, mask=m)`) is the
/// mask of the model's input inside it: the Dense passes it to the LSTM, the LSTM's mask flows
/// out to the per-step loss and the masked mean. Predictions, every term of the loss and every
/// gradient equal those of the same layers built flat with the mask given to the LSTM, for
/// masks that keep prefixes, masks with holes, and all-ones masks; and the mask matters.
#[test]
fn an_explicit_mask_given_to_a_nested_model_is_its_inputs_mask() {
    let rd = reader(6);
    let (steps, keep) = (Input::named("steps", [6, 3]), Input::named("keep", [6]));
    let h = rd.apply_with_mask(&steps, &keep).unwrap();
    assert_eq!(h.mask().map(|m| m.shape().to_vec()), Some(vec![6]));
    let (per_step, pooled) = masked_heads(&h);
    let mut nested = Model::new(&[&steps, &keep], &[&per_step, &pooled]).unwrap();

    let (steps, keep) = (Input::named("steps", [6, 3]), Input::named("keep", [6]));
    let h = Dense::new(4)
        .activation(Activation::Tanh)
        .apply(&steps)
        .unwrap();
    let h = Lstm::new(3)
        .return_sequences(true)
        .apply_with_mask(&h, &keep)
        .unwrap();
    let (per_step, pooled) = masked_heads(&h);
    let mut flat = Model::builder(&[&steps, &keep], &[&per_step, &pooled])
        .seed(17)
        .build()
        .unwrap();
    flat.set_weights(&nested.get_weights().unwrap()).unwrap();
    for m in [&mut nested, &mut flat] {
        m.compile(
            Compile::new(Sgd::new(0.1))
                .loss_for("per_step", "mse")
                .loss_for("pooled", "mse"),
        )
        .unwrap();
    }

    let xs = Tensor::from_vec(to_vec(&features(30, 3, 4)), (5, 6, 3), &Device::Cpu).unwrap();
    let targets = vec![
        Tensor::from_vec(to_vec(&features(30, 2, 8)), (5, 6, 2), &Device::Cpu).unwrap(),
        features(5, 1, 3),
    ];
    let masks = keep_masks();
    let mut pooled_by_mask = Vec::new();
    for mask in &masks {
        let inputs = [xs.clone(), mask.clone()];
        let (a, b) = (
            nested.predict(&inputs, 5).unwrap(),
            flat.predict(&inputs, 5).unwrap(),
        );
        close(&a[0], &b[0], 1e-6, "per-step predictions");
        close(&a[1], &b[1], 1e-6, "pooled predictions");
        pooled_by_mask.push(to_vec(&a[1]));

        let data = Dataset::multi(inputs.to_vec(), targets.clone()).unwrap();
        let (ln, lf) = (
            nested.evaluate(&data, 5).unwrap(),
            flat.evaluate(&data, 5).unwrap(),
        );
        for term in ["loss", "per_step_loss", "pooled_loss"] {
            let (n, f) = (ln.get(term).unwrap(), lf.get(term).unwrap());
            assert!(
                (n - f).abs() <= 1e-6 * (1.0 + f.abs()),
                "{term}: {n} vs {f}"
            );
        }
        let (gn, gf) = (
            nested.gradients(&data).unwrap(),
            flat.gradients(&data).unwrap(),
        );
        assert_eq!(gn.weights.len(), gf.weights.len());
        for ((n_name, n_grad), (f_name, f_grad)) in gn.weights.iter().zip(&gf.weights) {
            assert_eq!(n_name.trim_start_matches("reader/"), f_name);
            close(n_grad, f_grad, 1e-6, n_name);
        }
        assert!(to_vec(gn.weight("reader/lstm/kernel").unwrap())
            .iter()
            .any(|v| v.abs() > 1e-5));
    }
    // Each mask gives other values: the mask reaches the layers inside.
    assert!(pooled_by_mask[0] != pooled_by_mask[1] && pooled_by_mask[1] != pooled_by_mask[2]);
    // The per-step loss leaves masked steps out: a target changed only at masked steps
    // leaves it as it was.
    let mask = &masks[0];
    let far = ((1.0 - mask)
        .unwrap()
        .unsqueeze(2)
        .unwrap()
        .broadcast_as((5, 6, 2))
        .unwrap()
        * 100.0)
        .unwrap();
    let moved = vec![(&targets[0] + far).unwrap(), targets[1].clone()];
    let logs = |t: Vec<Tensor>| {
        let data = Dataset::multi(vec![xs.clone(), mask.clone()], t).unwrap();
        nested
            .evaluate(&data, 5)
            .unwrap()
            .get("per_step_loss")
            .unwrap()
    };
    let (before, after) = (logs(targets.clone()), logs(moved));
    assert!((before - after).abs() < 1e-6, "{before} vs {after}");
}

/// A mask given for one input of a two-input model reaches only the layers that read that
/// input; `None` keeps the mask the other tensor carries (an Embedding's `mask_zero`). The
/// values equal the flat layers', and a model nested in a nested model passes the mask on.
#[test]
fn masks_given_per_input_and_through_two_levels_of_nesting() {
    let (a, b) = (Input::named("a", [4, 2]), Input::named("b", [4, 2]));
    let ra = Gru::new(3).apply(&a).unwrap();
    let rb = Gru::new(3).apply(&b).unwrap();
    let both = Concatenate::new().apply_many(&[&ra, &rb]).unwrap();
    let pair = Model::builder(&[&a, &b], &[&both])
        .name("pair")
        .seed(2)
        .build()
        .unwrap();
    // A middle model that applies `pair` to its own inputs, given the mask from outside.
    let (ma, mb, mk) = (Input::new([4, 2]), Input::new([4, 2]), Input::new([4]));
    let inner = pair
        .apply_many_with_masks(&[&ma, &mb], &[Some(&mk), None])
        .unwrap();
    let middle = Model::builder(&[&ma, &mb, &mk], &inner)
        .name("middle")
        .build()
        .unwrap();

    let (x, ids, keep) = (Input::new([4, 2]), Input::new([4]), Input::new([4]));
    let e = Embedding::new(5, 2).mask_zero(true).apply(&ids).unwrap();
    let y = pair
        .apply_many_with_masks(&[&x, &e], &[Some(&keep), None])
        .unwrap()
        .remove(0);
    let nested = Model::new(&[&x, &ids, &keep], &[&y]).unwrap();
    let y2 = middle.apply_many(&[&x, &e, &keep]).unwrap().remove(0);
    let twice = Model::new(&[&x, &ids, &keep], &[&y2]).unwrap();
    twice.set_weights(&nested.get_weights().unwrap()).unwrap();

    let (x, ids, keep) = (Input::new([4, 2]), Input::new([4]), Input::new([4]));
    let e = Embedding::new(5, 2).mask_zero(true).apply(&ids).unwrap();
    let ra = Gru::new(3).apply_with_mask(&x, &keep).unwrap();
    let rb = Gru::new(3).apply(&e).unwrap();
    let y = Concatenate::new().apply_many(&[&ra, &rb]).unwrap();
    let flat = Model::builder(&[&x, &ids, &keep], &[&y])
        .seed(9)
        .build()
        .unwrap();
    flat.set_weights(&nested.get_weights().unwrap()).unwrap();

    let xs = Tensor::from_vec(to_vec(&features(12, 2, 5)), (3, 4, 2), &Device::Cpu).unwrap();
    let tokens = Tensor::new(
        &[[1f32, 2., 0., 0.], [3., 4., 1., 0.], [2., 0., 0., 0.]],
        &Device::Cpu,
    )
    .unwrap();
    let keep = Tensor::new(
        &[[1f32, 1., 1., 0.], [1., 0., 0., 0.], [0., 1., 1., 1.]],
        &Device::Cpu,
    )
    .unwrap();
    let inputs = [xs.clone(), tokens.clone(), keep];
    let want = flat.predict(&inputs, 3).unwrap().remove(0);
    close(
        &nested.predict(&inputs, 3).unwrap()[0],
        &want,
        1e-6,
        "one level",
    );
    close(
        &twice.predict(&inputs, 3).unwrap()[0],
        &want,
        1e-6,
        "two levels",
    );
    // Keeping every step changes the first GRU's values only.
    let all = Tensor::ones((3, 4), DType::F32, &Device::Cpu).unwrap();
    let open = nested.predict(&[xs, tokens, all], 3).unwrap().remove(0);
    let (w, o) = (to_vec(&want), to_vec(&open));
    for row in 0..3 {
        assert!(
            w[row * 6..row * 6 + 3] != o[row * 6..row * 6 + 3],
            "row {row}"
        );
        assert_eq!(
            w[row * 6 + 3..row * 6 + 6],
            o[row * 6 + 3..row * 6 + 6],
            "row {row}"
        );
    }
}

/// A mask of the wrong shape or count names the model, the input and the shapes; a model of
/// several outputs given one mask is told to use apply_many_with_masks; a model applied with
/// a mask is named by the Keras export, which cannot write it yet.
#[test]
fn a_misfit_mask_for_a_nested_model_names_the_model_and_the_shapes() {
    let rd = reader(1);
    let x = Input::new([6, 3]);
    let msg = rd
        .apply_with_mask(&x, &Input::new([5]))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("model `reader`")
            && msg.contains("input `input`")
            && msg.contains("[5]")
            && msg.contains("[6]"),
        "{msg}"
    );
    let msg = rd
        .apply_many_with_masks(&[&x], &[None, None])
        .unwrap_err()
        .to_string();
    assert!(msg.contains("given 2 mask(s)"), "{msg}");

    let s = Input::new([6, 3]);
    let two = Model::new(&[&s], &[&Dense::new(1).apply(&s).unwrap(), &s]).unwrap();
    let msg = two
        .apply_with_mask(&x, &Input::new([6]))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("apply_many_with_masks"), "{msg}");

    let keep = Input::new([6]);
    let y = rd.apply_with_mask(&x, &keep).unwrap();
    let model = Model::new(&[&x, &keep], &[&y]).unwrap();
    let dir = temp("nested", "mask-export");
    let err = model
        .save_keras(dir.join("m.keras"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("[\"reader\"]") && err.contains("explicit masks"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// An adversarial term stays the outer model's: a nested model that has one is refused with a
/// message that names the model and the term and says to add it to the outer model, and that
/// advice gives the term its meaning, checked by hand on a linear nested model: the outer
/// inputs moved by ε · sign(∂L/∂x) of the outer loss, x_adv = x + ε · sign(r) · sign(W), and
/// the term is 0.5 · mean (x_adv·W + b − y)².
#[test]
fn an_adversarial_term_belongs_to_the_outer_model() {
    let (w, b, eps) = ([0.7, -0.4, 0.2], 0.1, 0.05);
    let linear = |with_term: bool| {
        let x = Input::new([3]);
        let y = Dense::new(1).with_name("y").apply(&x).unwrap();
        let mut m = Model::builder(&[x], &[y])
            .name("linear")
            .dtype(DType::F64)
            .build()
            .unwrap();
        let kernel = Tensor::from_vec(w.to_vec(), (3, 1), &Device::Cpu).unwrap();
        m.weight("y/kernel").unwrap().var.set(&kernel).unwrap();
        let bias = Tensor::new(&[b], &Device::Cpu).unwrap();
        m.weight("y/bias").unwrap().var.set(&bias).unwrap();
        if with_term {
            m.add_loss_term("fgsm", Adversarial::fgsm(eps)).unwrap();
        }
        m
    };
    let msg = linear(true)
        .apply(&Input::new([3]))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("model `linear`")
            && msg.contains("`fgsm`")
            && msg.contains("outer.add_loss_term(\"fgsm\""),
        "{msg}"
    );

    let inner = linear(false);
    let x = Input::new([3]);
    let y = inner.apply(&x).unwrap();
    let mut outer = Model::builder(&[x], &[y])
        .dtype(DType::F64)
        .build()
        .unwrap();
    outer
        .add_loss_term("fgsm", Adversarial::fgsm(eps).multiplier(0.5))
        .unwrap();
    outer
        .compile(Compile::new(Sgd::new(0.1)).loss("mse"))
        .unwrap();
    let xs = [
        [0.3, -1.2, 0.5],
        [1.1, 0.4, -0.7],
        [-0.2, 0.9, 1.5],
        [0.8, -0.6, 0.1],
    ];
    let ys = [0.5, -1.0, 2.0, 0.3];
    let data = Dataset::new(
        Tensor::from_vec(xs.concat(), (4, 3), &Device::Cpu).unwrap(),
        Tensor::from_vec(ys.to_vec(), (4, 1), &Device::Cpu).unwrap(),
    )
    .unwrap();
    let logs = outer.evaluate(&data, 4).unwrap();
    let predict = |x: &[f64; 3]| x.iter().zip(w).map(|(a, k)| a * k).sum::<f64>() + b;
    let mut want = 0.0;
    for (x, y) in xs.iter().zip(ys) {
        let r = predict(x) - y;
        let moved: Vec<f64> = x
            .iter()
            .zip(w)
            .map(|(a, k): (&f64, f64)| a + eps * r.signum() * k.signum())
            .collect();
        let r_adv = predict(&[moved[0], moved[1], moved[2]]) - y;
        want += 0.5 * r_adv * r_adv / 4.0;
    }
    let got = logs.get("fgsm").unwrap();
    assert!((got - want).abs() < 1e-9, "fgsm {got} vs {want} by hand");
}
