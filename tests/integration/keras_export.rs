//! Models built in kiln, written as Keras `.keras` files: every layer family kiln has comes
//! back from the file with the same weights (bit for bit), the same frozen layers and the same
//! predictions; what Keras cannot express is refused naming the layer.
//!
//! With `KILN_EXPORT_DIR=DIR`, the test also leaves each exported file in DIR with NAME.json
//! (the inputs and kiln's predictions), for tests/fixtures/keras/check_exports.py to load in
//! real Keras.

use candle_core::{DType, Device, Tensor};
use kiln::prelude::*;
use serde_json::{json, Value};
use std::path::PathBuf;

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-keras-native-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Deterministic values in [-0.5, 0.5), or in [0.5, 1.5) for variances.
fn pattern(n: usize, seed: u64, positive: bool) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = ((s >> 40) as f32) / (1u64 << 24) as f32;
            if positive {
                0.5 + u
            } else {
                u - 0.5
            }
        })
        .collect()
}

/// Moves every weight off its initial value (biases, BatchNormalization's moving statistics,
/// LayerNormalization's gamma), so a weight written in the wrong place is seen.
fn perturb(model: &Model) {
    for (i, w) in model.weights().iter().enumerate() {
        if w.name.ends_with("/count") {
            continue;
        }
        let positive = w.name.ends_with("variance");
        let v = pattern(w.var.elem_count(), i as u64 + 1, positive);
        let t = Tensor::from_vec(v, w.var.dims(), &Device::Cpu).unwrap();
        w.var.set(&t).unwrap();
    }
}

fn input(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    let v: Vec<f32> = pattern(n, seed, false).iter().map(|x| x * 4.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn nested(t: &Tensor) -> Value {
    let dims = t.dims().to_vec();
    let v: Vec<f64> = t
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
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

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Exports `model`, imports the file, and checks weights, frozen layers and predictions.
fn round_trip(name: &str, model: &Model, inputs: &[Tensor]) {
    let path = dir().join(format!("{name}.keras"));
    model
        .save_keras(&path)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let back = Model::from_keras(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
    let names = |m: &Model| {
        let mut n: Vec<String> = m.weights().iter().map(|w| w.name.clone()).collect();
        n.sort();
        n
    };
    assert_eq!(names(model), names(&back), "{name}: weight names");
    for w in model.weights() {
        let b = back.weight(&w.name).unwrap();
        assert_eq!(w.shape(), b.shape(), "{name} {}", w.name);
        assert_eq!(
            flat(w.var.as_tensor()),
            flat(b.var.as_tensor()),
            "{name} {}",
            w.name
        );
        assert_eq!(w.trainable(), b.trainable(), "{name} {} trainable", w.name);
    }
    let (a, b) = (
        model.predict(inputs, 64).unwrap(),
        back.predict(inputs, 64).unwrap(),
    );
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(flat(x), flat(y), "{name}: predictions");
    }
    if let Ok(out) = std::env::var("KILN_EXPORT_DIR") {
        std::fs::create_dir_all(&out).unwrap();
        std::fs::copy(&path, PathBuf::from(&out).join(format!("{name}.keras"))).unwrap();
        let case = json!({
            "inputs": inputs.iter().map(nested).collect::<Vec<_>>(),
            "predictions": a.iter().map(nested).collect::<Vec<_>>(),
        });
        std::fs::write(
            PathBuf::from(&out).join(format!("{name}.json")),
            case.to_string(),
        )
        .unwrap();
    }
    std::fs::remove_file(&path).unwrap();
}

/// Convolutions (strides, same padding, per-axis dilation, no bias), BatchNormalization, every
/// 2-D pooling.
#[test]
fn convolutions_normalization_and_pooling_2d_round_trip() {
    let x = Input::named("image", [8, 8, 2]);
    let h = Conv2D::new(4, 3)
        .strides(2)
        .padding(Padding::Same)
        .activation(Activation::Relu)
        .kernel_regularizer(L2::new(1e-3))
        .with_name("c1")
        .apply(&x)
        .unwrap();
    let h = Conv2D::new(3, (2, 3))
        .dilation_rate((2, 1))
        .padding(Padding::Same)
        .use_bias(false)
        .with_name("c2")
        .apply(&h)
        .unwrap();
    let h = BatchNormalization::new()
        .momentum(0.9)
        .epsilon(1e-3)
        .with_name("bn")
        .apply(&h)
        .unwrap();
    let m = MaxPooling2D::new((2, 2)).with_name("mp").apply(&h).unwrap();
    let a = AveragePooling2D::new((2, 1))
        .strides((1, 1))
        .padding(Padding::Same)
        .with_name("ap")
        .apply(&h)
        .unwrap();
    let g1 = GlobalMaxPooling2D::new()
        .with_name("gmax")
        .apply(&m)
        .unwrap();
    let g2 = GlobalAveragePooling2D::new()
        .with_name("gavg")
        .apply(&a)
        .unwrap();
    let f = Flatten::new().with_name("flat").apply(&m).unwrap();
    let c = Concatenate::new()
        .with_name("join")
        .apply_many(&[&g1, &g2, &f])
        .unwrap();
    let y = Dense::new(3).with_name("logits").apply(&c).unwrap();
    let model = Model::builder(&[x], &[y]).seed(1).build().unwrap();
    perturb(&model);
    round_trip("native_cnn2d", &model, &[input(&[3, 8, 8, 2], 7)]);
}

/// Causal and dilated Conv1D, 1-D pooling with same padding, LayerNormalization without a
/// center, Add.
#[test]
fn convolutions_normalization_and_pooling_1d_round_trip() {
    let x = Input::named("signal", [10, 3]);
    let h = Conv1D::new(4, 3)
        .padding(Padding::Causal)
        .dilation_rate(2)
        .activation(Activation::Tanh)
        .with_name("conv")
        .apply(&x)
        .unwrap();
    let h = MaxPooling1D::new(2)
        .strides(1)
        .padding(Padding::Same)
        .with_name("mp")
        .apply(&h)
        .unwrap();
    let h = AveragePooling1D::new(2).with_name("ap").apply(&h).unwrap();
    let h = LayerNormalization::new()
        .epsilon(1e-5)
        .center(false)
        .with_name("ln")
        .apply(&h)
        .unwrap();
    let a = GlobalAveragePooling1D::new()
        .with_name("gavg")
        .apply(&h)
        .unwrap();
    let b = GlobalMaxPooling1D::new()
        .with_name("gmax")
        .apply(&h)
        .unwrap();
    let s = Add::new().with_name("sum").apply_many(&[&a, &b]).unwrap();
    let y = Dense::new(2)
        .activation(Activation::Softmax)
        .with_name("out")
        .apply(&s)
        .unwrap();
    let model = Model::builder(&[x], &[y]).seed(2).build().unwrap();
    perturb(&model);
    round_trip("native_conv1d", &model, &[input(&[4, 10, 3], 8)]);
}

/// Channels-first layers (`ChannelsFirst`, Keras' `data_format="channels_first"`): Conv2D,
/// pooling, BatchNormalization over axis 1, global pooling with keepdims, Flatten, Conv1D.
#[test]
fn channels_first_layers_round_trip() {
    use kiln::layers::ChannelsFirst;
    let x = Input::named("img", [3, 7, 6]);
    let h = ChannelsFirst::new(
        Conv2D::new(4, (3, 2))
            .padding(Padding::Same)
            .activation(Activation::Relu)
            .with_name("conv"),
    )
    .apply(&x)
    .unwrap();
    let h = ChannelsFirst::new(MaxPooling2D::new((2, 2)).with_name("mp"))
        .apply(&h)
        .unwrap();
    let h = BatchNormalization::new()
        .axis(1)
        .with_name("bn")
        .apply(&h)
        .unwrap();
    let a = ChannelsFirst::new(Flatten::new().with_name("flat"))
        .apply(&h)
        .unwrap();
    let b = ChannelsFirst::new(
        GlobalAveragePooling2D::new()
            .keepdims(true)
            .with_name("gap"),
    )
    .apply(&h)
    .unwrap();
    let b = Flatten::new().with_name("flat_gap").apply(&b).unwrap();
    let s = Input::named("seq", [2, 8]);
    let g = ChannelsFirst::new(Conv1D::new(3, 3).strides(2).with_name("conv1d"))
        .apply(&s)
        .unwrap();
    let g = ChannelsFirst::new(GlobalMaxPooling1D::new().with_name("gmax"))
        .apply(&g)
        .unwrap();
    let all = Concatenate::new()
        .with_name("all")
        .apply_many(&[&a, &b, &g])
        .unwrap();
    let y = Dense::new(2).with_name("out").apply(&all).unwrap();
    let model = Model::builder(&[x, s], &[y]).seed(4).build().unwrap();
    assert_eq!(
        model.weight("conv/kernel").unwrap().var.dims(),
        &[3, 2, 3, 4]
    );
    perturb(&model);
    round_trip(
        "native_channels_first",
        &model,
        &[input(&[4, 3, 7, 6], 11), input(&[4, 2, 8], 12)],
    );
}

/// Embedding with mask_zero into LSTM and GRU (both reset_after), Masking into an LSTM, two
/// inputs merged.
#[test]
fn recurrent_layers_and_masks_round_trip() {
    let tokens = Input::named("tokens", [6]);
    let seq = Input::named("seq", [4, 2]);
    let h = Embedding::new(12, 4)
        .mask_zero(true)
        .with_name("emb")
        .apply(&tokens)
        .unwrap();
    let h = Lstm::new(5)
        .return_sequences(true)
        .unit_forget_bias(false)
        .with_name("lstm")
        .apply(&h)
        .unwrap();
    let h = Gru::new(3).with_name("gru").apply(&h).unwrap();
    let m = Masking::new(0.0).with_name("mask").apply(&seq).unwrap();
    let g = Gru::new(2)
        .reset_after(false)
        .activation(Activation::Relu)
        .with_name("gru_classic")
        .apply(&m)
        .unwrap();
    let c = Concatenate::new()
        .with_name("both")
        .apply_many(&[&h, &g])
        .unwrap();
    let y = Dense::new(1)
        .activation(Activation::Sigmoid)
        .with_name("p")
        .apply(&c)
        .unwrap();
    let model = Model::builder(&[tokens, seq], &[y])
        .seed(3)
        .build()
        .unwrap();
    perturb(&model);
    let tok = Tensor::new(
        &[
            [3f32, 5., 1., 0., 0., 0.],
            [2., 2., 7., 9., 11., 1.],
            [4., 0., 0., 0., 0., 0.],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let mut s = flat(&input(&[3, 4, 2], 9));
    s[2 * 2..3 * 2].fill(0.0);
    s[8 + 3 * 2..8 + 4 * 2].fill(0.0);
    let s = Tensor::from_vec(s, (3, 4, 2), &Device::Cpu).unwrap();
    round_trip("native_recurrent", &model, &[tok, s]);
}

/// An encoder–decoder of layers with several outputs: an LSTM encoder over masked tokens that
/// returns its states, an LSTM decoder started from them (Keras' `initial_state`), a GRU that
/// returns its sequence and its state, and a GRU started from that state; a state is a model
/// output. Keras reads the states by their output index.
#[test]
fn recurrent_states_round_trip() {
    let tokens = Input::named("tokens", [6]);
    let seq = Input::named("seq", [4, 2]);
    let e = Embedding::new(12, 4)
        .mask_zero(true)
        .with_name("emb")
        .apply(&tokens)
        .unwrap();
    let enc = Lstm::new(5)
        .return_state(true)
        .with_name("encoder")
        .apply_outputs(&[&e])
        .unwrap();
    let dec = Lstm::new(5)
        .return_sequences(true)
        .with_name("decoder")
        .apply_outputs(&[&seq, &enc[1], &enc[2]])
        .unwrap();
    let top = Gru::new(3)
        .return_sequences(true)
        .return_state(true)
        .with_name("top")
        .apply_outputs(&[&dec[0]])
        .unwrap();
    let again = Gru::new(3)
        .reset_after(false)
        .with_name("again")
        .apply_outputs(&[&seq, &top[1]])
        .unwrap();
    let y = Dense::new(2).with_name("out").apply(&top[0]).unwrap();
    let model = Model::builder(&[&tokens, &seq], &[&y, &again[0], &enc[1]])
        .seed(5)
        .build()
        .unwrap();
    perturb(&model);
    let tok = Tensor::new(
        &[
            [3f32, 5., 1., 0., 0., 0.],
            [2., 2., 7., 9., 11., 1.],
            [4., 0., 0., 0., 0., 0.],
        ],
        &Device::Cpu,
    )
    .unwrap();
    round_trip("native_states", &model, &[tok, input(&[3, 4, 2], 10)]);
}

/// Two inputs and two outputs: Normalization adapted per feature and over two axes, Reshape,
/// Permute, Add, Multiply, Concatenate on an inner axis, a Dense layer shared by two branches,
/// Dropout, Activation and a frozen layer.
#[test]
fn merges_reshapes_shared_and_frozen_layers_round_trip() {
    let a = Input::named("a", [12]);
    let b = Input::named("b", [3, 4]);
    let na = Normalization::new()
        .with_name("norm_a")
        .adapt(&input(&[16, 12], 3))
        .unwrap()
        .apply(&a)
        .unwrap();
    let nb = Normalization::new()
        .axes(&[1, 2])
        .with_name("norm_b")
        .adapt(&input(&[16, 3, 4], 4))
        .unwrap()
        .apply(&b)
        .unwrap();
    let r = Reshape::new(vec![4, 3])
        .with_name("to_grid")
        .apply(&na)
        .unwrap();
    let p = Permute::new(vec![2, 1])
        .with_name("swap")
        .apply(&r)
        .unwrap();
    let s = Add::new().with_name("sum").apply_many(&[&p, &nb]).unwrap();
    let m = Multiply::new()
        .with_name("prod")
        .apply_many(&[&p, &nb])
        .unwrap();
    let c = Concatenate::new()
        .axis(1)
        .with_name("stack")
        .apply_many(&[&s, &m])
        .unwrap();
    let f = Flatten::new().with_name("flat").apply(&c).unwrap();
    let fs = Flatten::new().with_name("flat_sum").apply(&s).unwrap();
    let shared = Dense::new(5)
        .activation(Activation::Tanh)
        .with_name("shared")
        .shared();
    let h1 = shared.apply(&fs).unwrap();
    let h2 = shared
        .apply(&Flatten::new().with_name("flat_prod").apply(&m).unwrap())
        .unwrap();
    let h = Concatenate::new()
        .with_name("heads")
        .apply_many(&[&h1, &h2, &f])
        .unwrap();
    let h = Dropout::new(0.25).with_name("drop").apply(&h).unwrap();
    let h = ActivationLayer::new(Activation::Elu)
        .with_name("act")
        .apply(&h)
        .unwrap();
    let reg = Dense::new(2).with_name("reg").apply(&h).unwrap();
    let cls = Dense::new(1)
        .with_name("cls")
        .trainable(false)
        .apply(&h)
        .unwrap();
    let model = Model::builder(&[a, b], &[reg, cls])
        .seed(4)
        .build()
        .unwrap();
    perturb(&model);
    assert!(!model.weight("cls/kernel").unwrap().trainable());
    round_trip(
        "native_merges",
        &model,
        &[input(&[3, 12], 5), input(&[3, 3, 4], 6)],
    );
}

/// A layer of the user's own has no Keras class: the export names it and writes nothing.
#[test]
fn a_layer_keras_cannot_express_is_refused_naming_it() {
    struct Double;
    impl Layer for Double {
        fn kind(&self) -> &'static str {
            "double"
        }
        fn given_name(&self) -> Option<&str> {
            Some("twice")
        }
        fn output_shape(&self, s: &[Vec<usize>]) -> kiln::Result<Vec<usize>> {
            Ok(s[0].clone())
        }
        fn call(
            &self,
            inputs: &[Tensor],
            _ctx: &mut kiln::layers::CallContext,
        ) -> kiln::Result<Tensor> {
            Ok((&inputs[0] * 2.0)?)
        }
    }
    let x = Input::new([3]);
    let h = Double.apply(&x).unwrap();
    let y = Dense::new(1).apply(&h).unwrap();
    let model = Model::new(&[x], &[y]).unwrap();
    let path = dir().join("refused.keras");
    let msg = model.save_keras(&path).unwrap_err().to_string();
    assert!(
        msg.contains("layer `twice` (double) cannot be written as Keras")
            && msg.contains("nothing was written"),
        "{msg}"
    );
    assert!(!path.exists());
}

/// The layer options added for issue 16, built in kiln: BatchNormalization over axis 1 and
/// LayerNormalization over two axes, grouped Conv1D and Conv2D, an LSTM and a GRU with input
/// dropout and GRU recurrent dropout (inference ignores them).
#[test]
fn normalization_axes_groups_and_recurrent_dropout_round_trip() {
    let s = Input::named("seq", [5, 6]);
    let h = BatchNormalization::new()
        .axis(1)
        .with_name("bn_steps")
        .apply(&s)
        .unwrap();
    let h = LayerNormalization::new()
        .axes(&[1, 2])
        .with_name("ln_both")
        .apply(&h)
        .unwrap();
    let h = Conv1D::new(4, 2)
        .groups(2)
        .padding(Padding::Same)
        .with_name("gconv1d")
        .apply(&h)
        .unwrap();
    let h = Lstm::new(3)
        .dropout(0.3)
        .return_sequences(true)
        .with_name("lstm")
        .apply(&h)
        .unwrap();
    let h = Gru::new(2)
        .dropout(0.2)
        .recurrent_dropout(0.35)
        .with_name("gru")
        .apply(&h)
        .unwrap();
    let i = Input::named("img", [4, 4, 4]);
    let g = Conv2D::new(6, (2, 2))
        .groups(2)
        .activation(Activation::Relu)
        .with_name("gconv2d")
        .apply(&i)
        .unwrap();
    let g = BatchNormalization::new()
        .axis(-2)
        .with_name("bn_width")
        .apply(&g)
        .unwrap();
    let g = GlobalAveragePooling2D::new()
        .with_name("pool")
        .apply(&g)
        .unwrap();
    let c = Concatenate::new()
        .with_name("both")
        .apply_many(&[&h, &g])
        .unwrap();
    let y = Dense::new(2).with_name("out").apply(&c).unwrap();
    let model = Model::builder(&[s, i], &[y]).seed(3).build().unwrap();
    perturb(&model);
    assert_eq!(model.weight("ln_both/gamma").unwrap().var.dims(), &[5, 6]);
    assert_eq!(
        model.weight("gconv2d/kernel").unwrap().var.dims(),
        &[2, 2, 2, 6]
    );
    round_trip(
        "native_options",
        &model,
        &[input(&[3, 5, 6], 11), input(&[3, 4, 4, 4], 12)],
    );
}

/// Models used as layers of a kiln model: an encoder applied twice (shared weights, a
/// BatchNormalization inside), a frozen model of two inputs and two outputs, and a model nested
/// in a nested model are written as Keras' Functional inside a Functional and come back with
/// their nested weight names, frozen layers and predictions.
#[test]
fn nested_models_round_trip() {
    let x = Input::named("features", [6]);
    let h = Dense::new(5)
        .activation(Activation::Relu)
        .apply(&x)
        .unwrap();
    let h = BatchNormalization::new().apply(&h).unwrap();
    let h = Dense::new(4)
        .activation(Activation::Tanh)
        .apply(&h)
        .unwrap();
    let encoder = Model::builder(&[x], &[h])
        .name("encoder")
        .seed(1)
        .build()
        .unwrap();
    let (p, q) = (Input::named("p", [4]), Input::named("q", [4]));
    let mix = Dense::new(3)
        .with_name("mix")
        .apply(&Concatenate::new().apply_many(&[&p, &q]).unwrap())
        .unwrap();
    let side = Dense::new(2).with_name("side").apply(&p).unwrap();
    let pair = Model::builder(&[p, q], &[mix, side])
        .name("pair")
        .seed(2)
        .build()
        .unwrap();
    pair.set_all_trainable(false);

    let (a, b) = (Input::named("a", [6]), Input::named("b", [6]));
    let (ea, eb) = (encoder.apply(&a).unwrap(), encoder.apply(&b).unwrap());
    let outs = pair.apply_many(&[&ea, &eb]).unwrap();
    let joined = Concatenate::new()
        .apply_many(&[&outs[0], &outs[1]])
        .unwrap();
    let y = Dense::new(1).with_name("score").apply(&joined).unwrap();
    let model = Model::builder(&[a, b], &[y, outs[0].clone()])
        .seed(3)
        .build()
        .unwrap();
    perturb(&model);
    assert!(model
        .weight("encoder/batch_normalization/moving_variance")
        .is_ok());
    assert!(!model.weight("pair/mix/kernel").unwrap().trainable());
    round_trip(
        "native_nested",
        &model,
        &[input(&[5, 6], 7), input(&[5, 6], 8)],
    );

    // A model nested in a nested model.
    let x = Input::new([3]);
    let inner = Model::builder(&[&x], &[&Dense::new(4).apply(&x).unwrap()])
        .name("inner")
        .build()
        .unwrap();
    let x = Input::new([3]);
    let h = Dense::new(2)
        .activation(Activation::Sigmoid)
        .apply(&inner.apply(&x).unwrap())
        .unwrap();
    let middle = Model::builder(&[x], &[h]).name("middle").build().unwrap();
    let x = Input::new([3]);
    let y = Dense::new(1)
        .with_name("out")
        .apply(&middle.apply(&x).unwrap())
        .unwrap();
    let model = Model::new(&[x], &[y]).unwrap();
    perturb(&model);
    assert!(model.weight("middle/inner/dense/kernel").is_ok());
    round_trip("native_nested_deep", &model, &[input(&[4, 3], 9)]);
}
