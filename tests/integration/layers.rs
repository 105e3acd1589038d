//! The layers: forward values against real Keras 3.15.1 (tests/fixtures/keras_layers.json, made by
//! tests/fixtures/make_layer_cases.py), masks, gradients against finite differences, padding
//! invariance of a masked sequence model, regularizer hooks, and the two examples.

use candle_core::{DType, Device, Tensor};
use kiln::layers::Weight;
use kiln::losses::loss_fn;
use kiln::prelude::*;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

#[path = "../../examples/cnn_digits.rs"]
mod cnn_digits;
#[path = "../../examples/sequence_labelling.rs"]
mod sequence_labelling;

// ---- Fixture plumbing --------------------------------------------------------------------------

fn fixture() -> &'static Value {
    static FIXTURE: OnceLock<Value> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keras_layers.json");
        let text = std::fs::read_to_string(&path).expect("fixture readable");
        serde_json::from_str(&text).expect("fixture is JSON")
    })
}

fn cases() -> &'static serde_json::Map<String, Value> {
    fixture()["cases"].as_object().expect("cases")
}

fn flatten_into(v: &Value, out: &mut Vec<f64>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten_into(i, out)),
        Value::Number(n) => out.push(n.as_f64().expect("number")),
        other => panic!("not a number: {other}"),
    }
}

/// A nested JSON list as a tensor of `dtype`.
fn tensor(v: &Value, dtype: DType) -> Tensor {
    let mut shape = Vec::new();
    let mut cur = v;
    while let Value::Array(items) = cur {
        shape.push(items.len());
        match items.first() {
            Some(first) => cur = first,
            None => break,
        }
    }
    let mut flat = Vec::new();
    flatten_into(v, &mut flat);
    Tensor::from_vec(flat, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `Err` with the worst element when `actual` and `expected` differ beyond rtol/atol 1e-5.
fn compare(what: &str, actual: &Tensor, expected: &Tensor) -> std::result::Result<(), String> {
    if actual.dims() != expected.dims() {
        return Err(format!(
            "{what}: shape {:?}, Keras {:?}",
            actual.dims(),
            expected.dims()
        ));
    }
    let (a, e) = (values(actual), values(expected));
    for (i, (x, y)) in a.iter().zip(&e).enumerate() {
        if x.is_nan() || (x - y).abs() > 1e-5 + 1e-5 * y.abs() {
            return Err(format!("{what}[{i}]: kiln {x} vs Keras {y}"));
        }
    }
    Ok(())
}

/// The kiln model of a fixture case, with the same layer names as the Keras one.
fn keras_twin(name: &str) -> (Vec<SymbolicTensor>, SymbolicTensor) {
    let one = |shape: &[usize], f: &dyn Fn(&SymbolicTensor) -> kiln::Result<SymbolicTensor>| {
        let x = Input::new(shape.to_vec());
        let y = f(&x).unwrap();
        (vec![x], y)
    };
    let masked = |x: &SymbolicTensor| Masking::new(0.0).with_name("masking").apply(x);
    let conv1d = |n: usize, f: &dyn Fn(Conv1D) -> Conv1D| {
        one(&[n, 3], &|x| {
            f(Conv1D::new(4, 3).with_name("conv")).apply(x)
        })
    };
    let conv2d = |s: [usize; 3], k: (usize, usize), f: &dyn Fn(Conv2D) -> Conv2D| {
        one(&s, &|x| f(Conv2D::new(3, k).with_name("conv")).apply(x))
    };
    let pair = |s1: &[usize], s2: &[usize], l: SharedLayer| {
        let (a, b) = (Input::new(s1.to_vec()), Input::new(s2.to_vec()));
        let y = l.apply_many(&[&a, &b]).unwrap();
        (vec![a, b], y)
    };
    let masked_pair = |steps2: usize, second_masked: bool, l: SharedLayer| {
        let (a, b) = (Input::new([5, 2]), Input::new([steps2, 2]));
        let ha = Masking::new(0.0).apply(&a).unwrap();
        let hb = if second_masked {
            Masking::new(0.0).apply(&b).unwrap()
        } else {
            b.clone()
        };
        let y = l.apply_many(&[&ha, &hb]).unwrap();
        (vec![a, b], y)
    };
    match name {
        "embedding_mask_zero" => one(&[4], &|x| {
            Embedding::new(6, 3)
                .mask_zero(true)
                .with_name("emb")
                .apply(x)
        }),
        "masking" => one(&[4, 3], &|x| masked(x)),
        "lstm_masked_sequences" => one(&[5, 2], &|x| {
            Lstm::new(4)
                .return_sequences(true)
                .with_name("lstm")
                .apply(&masked(x)?)
        }),
        "lstm_masked_last" => one(&[5, 2], &|x| {
            Lstm::new(4).with_name("lstm").apply(&masked(x)?)
        }),
        "lstm_sequences" => one(&[5, 2], &|x| {
            Lstm::new(3)
                .return_sequences(true)
                .with_name("lstm")
                .apply(x)
        }),
        "gru_masked_sequences" => one(&[5, 2], &|x| {
            Gru::new(4)
                .return_sequences(true)
                .with_name("gru")
                .apply(&masked(x)?)
        }),
        "gru_last" => one(&[5, 2], &|x| Gru::new(3).with_name("gru").apply(x)),
        "gru_reset_before_masked_sequences" => one(&[5, 2], &|x| {
            Gru::new(3)
                .return_sequences(true)
                .reset_after(false)
                .with_name("gru")
                .apply(&masked(x)?)
        }),
        "conv1d_valid" => conv1d(7, &|c| c),
        "conv1d_same_stride2" => conv1d(8, &|c| c.strides(2).padding(Padding::Same)),
        "conv1d_same_stride3_odd" => conv1d(7, &|c| {
            c.strides(3)
                .padding(Padding::Same)
                .activation(Activation::Relu)
        }),
        "conv1d_causal_dilation2" => conv1d(7, &|c| c.padding(Padding::Causal).dilation_rate(2)),
        "conv1d_same_dilation2" => conv1d(6, &|c| {
            c.padding(Padding::Same).dilation_rate(2).use_bias(false)
        }),
        "conv2d_valid" => conv2d([5, 6, 2], (3, 3), &|c| c),
        "conv2d_same_stride2_uneven" => {
            conv2d([7, 6, 2], (3, 3), &|c| c.strides(2).padding(Padding::Same))
        }
        "conv2d_valid_stride2_uneven" => conv2d([7, 8, 2], (3, 2), &|c| c.strides(2)),
        "conv2d_same_strides_2_1" => conv2d([6, 5, 2], (2, 3), &|c| {
            c.strides((2, 1)).padding(Padding::Same)
        }),
        "conv2d_same_dilation2" => conv2d([6, 6, 2], (3, 3), &|c| {
            c.dilation_rate(2)
                .padding(Padding::Same)
                .activation(Activation::Tanh)
        }),
        "max_pooling1d" => one(&[7, 3], &|x| MaxPooling1D::new(2).apply(x)),
        "max_pooling1d_overlap_same" => one(&[8, 2], &|x| {
            MaxPooling1D::new(3)
                .strides(2)
                .padding(Padding::Same)
                .apply(x)
        }),
        "average_pooling1d" => one(&[6, 2], &|x| AveragePooling1D::new(2).apply(x)),
        "average_pooling1d_same" => one(&[8, 2], &|x| {
            AveragePooling1D::new(3)
                .strides(2)
                .padding(Padding::Same)
                .apply(x)
        }),
        "max_pooling2d" => one(&[5, 7, 2], &|x| MaxPooling2D::new((2, 2)).apply(x)),
        "max_pooling2d_same_overlap" => one(&[7, 6, 2], &|x| {
            MaxPooling2D::new((3, 3))
                .strides((2, 2))
                .padding(Padding::Same)
                .apply(x)
        }),
        "average_pooling2d" => one(&[4, 7, 2], &|x| AveragePooling2D::new((2, 3)).apply(x)),
        "average_pooling2d_same" => one(&[7, 6, 2], &|x| {
            AveragePooling2D::new((3, 3))
                .strides((2, 2))
                .padding(Padding::Same)
                .apply(x)
        }),
        "average_pooling2d_same_stride1" => one(&[3, 4, 1], &|x| {
            AveragePooling2D::new((2, 2))
                .strides((1, 1))
                .padding(Padding::Same)
                .apply(x)
        }),
        "global_average_pooling2d" => one(&[3, 4, 2], &|x| GlobalAveragePooling2D::new().apply(x)),
        "global_max_pooling2d" => one(&[3, 4, 2], &|x| GlobalMaxPooling2D::new().apply(x)),
        "global_max_pooling1d" => one(&[5, 3], &|x| GlobalMaxPooling1D::new().apply(x)),
        "global_average_pooling1d_masked" => one(&[5, 2], &|x| {
            GlobalAveragePooling1D::new().apply(&masked(x)?)
        }),
        "batch_normalization_inference" => one(&[3, 2], &|x| {
            BatchNormalization::new().with_name("bn").apply(x)
        }),
        "batch_normalization_training" => one(&[3, 2], &|x| {
            BatchNormalization::new()
                .momentum(0.9)
                .with_name("bn")
                .apply(x)
        }),
        "batch_normalization_training_masked" => one(&[5, 2], &|x| {
            BatchNormalization::new()
                .momentum(0.8)
                .with_name("bn")
                .apply(&masked(x)?)
        }),
        "layer_normalization" => one(&[3, 5], &|x| {
            LayerNormalization::new().with_name("ln").apply(x)
        }),
        "add" => pair(&[3, 4], &[3, 4], Add::new().shared()),
        "multiply" => pair(&[3, 4], &[3, 4], Multiply::new().shared()),
        "concatenate" => pair(&[3, 4], &[3, 4], Concatenate::new().shared()),
        "concatenate_axis1" => pair(&[3, 4], &[2, 4], Concatenate::new().axis(1).shared()),
        "reshape" => one(&[3, 4], &|x| Reshape::new([2, -1]).apply(x)),
        "add_masked" => masked_pair(5, true, Add::new().shared()),
        "multiply_masked" => masked_pair(5, true, Multiply::new().shared()),
        "concatenate_masked_features" => masked_pair(5, true, Concatenate::new().shared()),
        "concatenate_one_masked" => masked_pair(5, false, Concatenate::new().shared()),
        "concatenate_masked_steps" => masked_pair(3, true, Concatenate::new().axis(1).shared()),
        "sequence_model" => one(&[7], &|x| {
            let h = Embedding::new(10, 4)
                .mask_zero(true)
                .with_name("emb")
                .apply(x)?;
            let h = Lstm::new(5)
                .return_sequences(true)
                .with_name("lstm")
                .apply(&h)?;
            Dense::new(3).with_name("tags").apply(&h)
        }),
        other => panic!("no kiln twin for fixture case `{other}`"),
    }
}

/// The twin model with the case's weights.
fn twin_with_weights(name: &str, case: &Value) -> (Model, SymbolicTensor) {
    let (inputs, output) = keras_twin(name);
    let model = Model::new(&inputs, std::slice::from_ref(&output)).unwrap();
    for (w, v) in case["weights"].as_object().unwrap() {
        let weight = model.weight(w).unwrap();
        let value = tensor(v, DType::F32);
        assert_eq!(weight.var.dims(), value.dims(), "{name}: weight {w}");
        weight.var.set(&value).unwrap();
    }
    (model, output)
}

fn case_inputs(case: &Value) -> Vec<Tensor> {
    case["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| tensor(v, DType::F32))
        .collect()
}

/// The output of one training-mode pass (read by an added term), after which the model's
/// non-trainable state (moving statistics) has been updated once. The learning rate is 0.
fn training_pass(
    model: &mut Model,
    output: &SymbolicTensor,
    inputs: Vec<Tensor>,
    out_dims: &[usize],
) -> Tensor {
    let seen: Arc<Mutex<Option<Tensor>>> = Arc::new(Mutex::new(None));
    let (slot, out) = (seen.clone(), output.clone());
    model
        .add_loss("capture", move |t: &Tensors| {
            let y = t.get(&out)?;
            *slot.lock().unwrap() = Some(y.detach());
            Ok(y.zeros_like()?.sum_all()?)
        })
        .unwrap();
    model
        .compile(Compile::new(Sgd::new(0.0)).loss(MeanSquaredError::new()))
        .unwrap();
    let n = inputs[0].dims()[0];
    let targets = Tensor::zeros(out_dims, DType::F32, &Device::Cpu).unwrap();
    let data = Dataset::multi(inputs, vec![targets]).unwrap();
    model
        .fit(&data, Fit::new().batch_size(n).shuffle(false).quiet())
        .unwrap();
    let y = seen.lock().unwrap().clone().expect("the added term ran");
    y
}

/// Σ mask[b, t] · 2^(b·T + t): a mask written as one exact number, read through a sum-reduced loss.
fn mask_code(mask: &[Vec<f64>]) -> f64 {
    let steps = mask[0].len();
    let mut code = 0.0;
    for (b, row) in mask.iter().enumerate() {
        for (t, &m) in row.iter().enumerate() {
            code += m * 2f64.powi((b * steps + t) as i32);
        }
    }
    code
}

/// The mask that reaches the model's output, read as `mask_code` through the loss: per-step
/// values `2^(b·T + t)` from the targets, summed (Reduction::Sum weights entries by the 0/1 mask).
/// An output without a mask gives the code of an all-ones mask.
fn mask_reaching_the_loss(model: &mut Model, inputs: Vec<Tensor>, out_dims: &[usize]) -> f64 {
    let (batch, steps) = (out_dims[0], out_dims[1]);
    let mut codes = Vec::new();
    for b in 0..batch {
        for t in 0..steps {
            let c = 2f64.powi((b * steps + t) as i32);
            codes.extend(std::iter::repeat_n(c, out_dims[2..].iter().product()));
        }
    }
    let targets = Tensor::from_vec(codes, out_dims, &Device::Cpu).unwrap();
    let code_loss = loss_fn("mask_code", |y_true: &Tensor, _y_pred: &Tensor| {
        Ok(y_true.mean(candle_core::D::Minus1)?)
    })
    .with_reduction(Reduction::Sum);
    model
        .compile(Compile::new(Sgd::new(0.0)).loss(code_loss))
        .unwrap();
    let data = Dataset::multi(inputs, vec![targets]).unwrap();
    model.evaluate(&data, batch).unwrap().get("loss").unwrap()
}

#[test]
fn every_layer_matches_keras_forward() {
    let fx = fixture();
    assert_eq!(fx["keras_version"], "3.15.1");
    let mut failures = Vec::new();
    let mut checked = 0;
    for (name, case) in cases() {
        let (mut model, output) = twin_with_weights(name, case);
        let inputs = case_inputs(case);
        let expected = tensor(&case["output"], DType::F32);
        let actual = if name.contains("training") {
            training_pass(&mut model, &output, inputs, expected.dims())
        } else {
            model.predict(&inputs, 64).unwrap().remove(0)
        };
        if let Err(e) = compare(name, &actual, &expected) {
            failures.push(e);
        }
        for stat in ["moving_mean", "moving_variance"] {
            if let Some(v) = case.get(stat) {
                let w = model.weight(&format!("bn/{stat}")).unwrap();
                if let Err(e) = compare(
                    &format!("{name} {stat}"),
                    w.var.as_tensor(),
                    &tensor(v, DType::F32),
                ) {
                    failures.push(e);
                }
            }
        }
        checked += 1;
    }
    assert!(checked >= 46, "only {checked} cases");
    assert!(
        failures.is_empty(),
        "{} of {checked} cases differ from Keras:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn masks_reach_the_loss_as_keras_computes_them() {
    let mut checked = 0;
    for (name, case) in cases() {
        let Some(mask) = case.get("mask") else {
            continue;
        };
        let (mut model, _) = twin_with_weights(name, case);
        let expected: Vec<Vec<f64>> = serde_json::from_value(mask.clone()).unwrap();
        let out_dims = tensor(&case["output"], DType::F32).dims().to_vec();
        let got = mask_reaching_the_loss(&mut model, case_inputs(case), &out_dims);
        assert_eq!(got, mask_code(&expected), "{name}: mask {expected:?}");
        checked += 1;
    }
    assert_eq!(checked, 10);
}

#[test]
fn layers_without_a_time_axis_or_mask_support_stop_the_mask() {
    // Keras drops the mask at LSTM(return_sequences=False), global pooling, convolutions,
    // pooling, Reshape and Flatten: the loss then weighs every entry. (A Reshape to the same
    // shape keeps it on JAX, below; one that changes the shape, even and back, drops it.)
    let x = Tensor::new(
        &[
            [[1f32, 2.], [0., 0.], [0., 0.], [0., 0.]],
            [[3., 1.], [2., 2.], [0., 0.], [0., 0.]],
        ],
        &Device::Cpu,
    )
    .unwrap();
    type Head = fn(&SymbolicTensor) -> kiln::Result<SymbolicTensor>;
    let heads: Vec<(&str, Head)> = vec![
        ("conv1d", |h| Conv1D::new(2, 1).apply(h)),
        ("max_pooling1d", |h| MaxPooling1D::new(1).apply(h)),
        ("average_pooling1d", |h| AveragePooling1D::new(1).apply(h)),
        ("reshape", |h| {
            Reshape::new([4, 2]).apply(&Reshape::new([8, 1]).apply(h)?)
        }),
    ];
    for (what, head) in heads {
        let input = Input::new([4, 2]);
        let y = head(&Masking::new(0.0).apply(&input).unwrap()).unwrap();
        let mut model = Model::new(&[input], &[y]).unwrap();
        let got = mask_reaching_the_loss(&mut model, vec![x.clone()], &[2, 4, 2]);
        assert_eq!(got, 255.0, "{what}: no mask, every step counts");
    }
    // The same probe sees the mask when a layer keeps it.
    let input = Input::new([4, 2]);
    let y = Dense::new(2)
        .apply(&Masking::new(0.0).apply(&input).unwrap())
        .unwrap();
    let mut model = Model::new(&[input], &[y]).unwrap();
    let got = mask_reaching_the_loss(&mut model, vec![x.clone()], &[2, 4, 2]);
    assert_eq!(got, 1.0 + 16.0 + 32.0);
    // So does a Reshape to the input's own shape, as Keras 3 on JAX (the same array comes back).
    let input = Input::new([4, 2]);
    let y = Reshape::new([4, 2])
        .apply(&Masking::new(0.0).apply(&input).unwrap())
        .unwrap();
    let mut model = Model::new(&[input], &[y]).unwrap();
    let got = mask_reaching_the_loss(&mut model, vec![x], &[2, 4, 2]);
    assert_eq!(got, 1.0 + 16.0 + 32.0);
}

#[test]
fn masked_sequence_loss_matches_keras() {
    let case = &cases()["sequence_model"];
    let (mut model, _) = twin_with_weights("sequence_model", case);
    model
        .compile(
            Compile::new(Sgd::new(0.01))
                .loss(SparseCategoricalCrossentropy::new().from_logits(true)),
        )
        .unwrap();
    let ids = tensor(&case["inputs"][0], DType::F32);
    let tags = tensor(&case["targets"], DType::F32);
    let plain = Dataset::new(ids.clone(), tags.clone()).unwrap();
    let loss = model.evaluate(&plain, 4).unwrap().get("loss").unwrap();
    let keras = case["loss"].as_f64().unwrap();
    assert!(
        (loss - keras).abs() <= 1e-5 * keras,
        "{loss} vs Keras {keras}"
    );
    // Per-step sample weights [batch, steps], combined with the mask as Keras does.
    let weighted = plain
        .with_sample_weight(tensor(&case["step_weights"], DType::F32))
        .unwrap();
    let loss = model.evaluate(&weighted, 4).unwrap().get("loss").unwrap();
    let keras = case["weighted_loss"].as_f64().unwrap();
    assert!(
        (loss - keras).abs() <= 1e-5 * keras,
        "{loss} vs Keras {keras}"
    );
}

// ---- Gradients against finite differences ------------------------------------------------------

fn random(shape: &[usize], lo: f64, hi: f64, seed: u64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Zeroes the steps listed per sequence (so `Masking(0)` masks them).
fn with_padding(x: Tensor, pad: &[&[usize]]) -> Tensor {
    let (b, t, f) = x.dims3().unwrap();
    let mut v = values(&x);
    for (i, steps) in pad.iter().enumerate() {
        for &s in steps.iter() {
            for k in 0..f {
                v[(i * t + s) * f + k] = 0.0;
            }
        }
    }
    Tensor::from_vec(v, (b, t, f), &Device::Cpu).unwrap()
}

/// One SGD step with learning rate 1 over the whole batch moves each trainable weight by minus
/// the gradient of the training-mode total loss; compare every coordinate with central finite
/// differences of that loss (read from `fit` with learning rate 0, so batch statistics are those
/// of training).
fn check_training_gradients(what: &str, model: &mut Model, data: &Dataset) {
    let n = data.len();
    let fit = Fit::new().batch_size(n).shuffle(false).quiet();
    let trainable: Vec<Weight> = model
        .weights()
        .into_iter()
        .filter(|w| w.trainable())
        .collect();
    assert!(!trainable.is_empty(), "{what}: nothing to train");
    let frozen: Vec<(Weight, Tensor)> = model
        .weights()
        .into_iter()
        .filter(|w| !w.trainable())
        .map(|w| {
            let v = w.var.as_tensor().copy().unwrap();
            (w, v)
        })
        .collect();
    let restore = || {
        for (w, v) in &frozen {
            w.var.set(v).unwrap();
        }
    };
    model.set_learning_rate(0.0).unwrap();
    let total = |m: &mut Model| -> f64 {
        restore();
        m.fit(data, fit.clone())
            .unwrap()
            .last()
            .unwrap()
            .get("loss")
            .unwrap()
    };
    let before: Vec<Vec<f64>> = trainable
        .iter()
        .map(|w| values(w.var.as_tensor()))
        .collect();
    let eps = 1e-6;
    let mut fd: Vec<Vec<f64>> = Vec::new();
    for (w, base) in trainable.iter().zip(&before) {
        let set = |d: f64, i: usize| {
            let mut v = base.clone();
            v[i] += d;
            w.var
                .set(&Tensor::from_vec(v, w.var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        };
        let mut g = Vec::with_capacity(base.len());
        for i in 0..base.len() {
            set(eps, i);
            let up = total(model);
            set(-eps, i);
            let down = total(model);
            set(0.0, i);
            g.push((up - down) / (2.0 * eps));
        }
        fd.push(g);
    }
    restore();
    model.set_learning_rate(1.0).unwrap();
    model.fit(data, fit).unwrap();
    let mut checked = 0;
    for ((w, b), g) in trainable.iter().zip(&before).zip(&fd) {
        let after = values(w.var.as_tensor());
        for i in 0..b.len() {
            let step = b[i] - after[i];
            assert!(
                (step - g[i]).abs() <= 1e-6 + 1e-5 * g[i].abs(),
                "{what}: {}[{i}]: step {step} vs finite difference {}",
                w.name,
                g[i]
            );
            checked += 1;
        }
    }
    let moved = fd.iter().flatten().filter(|g| g.abs() > 1e-8).count();
    assert!(
        moved * 2 > checked,
        "{what}: most gradients are zero ({moved} of {checked})"
    );
}

fn compiled_f64(inputs: &[SymbolicTensor], output: &SymbolicTensor, seed: u64) -> Model {
    let mut model = Model::builder(inputs, std::slice::from_ref(output))
        .dtype(DType::F64)
        .seed(seed)
        .build()
        .unwrap();
    model
        .compile(Compile::new(Sgd::new(1.0)).loss(MeanSquaredError::new()))
        .unwrap();
    model
}

#[test]
fn recurrent_gradients_match_finite_differences() {
    let x = with_padding(random(&[3, 5, 2], -1.0, 1.0, 1), &[&[3, 4], &[], &[0, 2]]);
    let y = random(&[3, 5, 2], -1.0, 1.0, 2);
    type Rnn = fn(&SymbolicTensor) -> kiln::Result<SymbolicTensor>;
    let cells: Vec<(&str, Rnn)> = vec![
        ("lstm", |h| Lstm::new(3).return_sequences(true).apply(h)),
        ("gru", |h| Gru::new(3).return_sequences(true).apply(h)),
        ("gru_reset_before", |h| {
            Gru::new(3)
                .return_sequences(true)
                .reset_after(false)
                .apply(h)
        }),
    ];
    for (what, cell) in cells {
        let input = Input::new([5, 2]);
        let h = cell(&Masking::new(0.0).apply(&input).unwrap()).unwrap();
        let out = Dense::new(2).apply(&h).unwrap();
        let mut model = compiled_f64(&[input], &out, 3);
        let data = Dataset::new(x.clone(), y.clone()).unwrap();
        check_training_gradients(what, &mut model, &data);
    }
    // Token ids through Embedding(mask_zero): the table's gradient, padding id 0 included.
    let ids = Tensor::new(
        &[
            [3f64, 1., 4., 0., 0.],
            [2., 7., 1., 5., 6.],
            [0., 5., 0., 2., 0.],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let input = Input::new([5]);
    let e = Embedding::new(8, 3).mask_zero(true).apply(&input).unwrap();
    let h = Gru::new(3).return_sequences(true).apply(&e).unwrap();
    let out = Dense::new(2).apply(&h).unwrap();
    let mut model = compiled_f64(&[input], &out, 12);
    let data = Dataset::new(ids, y.clone()).unwrap();
    check_training_gradients("embedding", &mut model, &data);
    // The last state only, no mask.
    let input = Input::new([5, 2]);
    let out = Dense::new(2)
        .apply(&Lstm::new(3).apply(&input).unwrap())
        .unwrap();
    let mut model = compiled_f64(&[input], &out, 4);
    let data = Dataset::new(x, random(&[3, 2], -1.0, 1.0, 5)).unwrap();
    check_training_gradients("lstm_last", &mut model, &data);
}

#[test]
fn convolution_and_pooling_gradients_match_finite_differences() {
    type Net = fn(&SymbolicTensor) -> kiln::Result<SymbolicTensor>;
    let nets: Vec<(&str, Vec<usize>, Net)> = vec![
        (
            "conv2d same stride 2, uneven, max pool",
            vec![7, 6, 2],
            |x| {
                let h = Conv2D::new(2, (3, 3))
                    .strides(2)
                    .padding(Padding::Same)
                    .activation(Activation::Tanh)
                    .apply(x)?;
                let h = MaxPooling2D::new((2, 2)).apply(&h)?;
                Dense::new(1).apply(&Flatten::new().apply(&h)?)
            },
        ),
        (
            "conv2d strides (2, 1), overlapping same max pool",
            vec![6, 5, 1],
            |x| {
                let h = Conv2D::new(2, (2, 3))
                    .strides((2, 1))
                    .padding(Padding::Same)
                    .apply(x)?;
                let h = MaxPooling2D::new((3, 3))
                    .strides((2, 2))
                    .padding(Padding::Same)
                    .apply(&h)?;
                Dense::new(1).apply(&Flatten::new().apply(&h)?)
            },
        ),
        ("conv2d dilation 2, average pool same", vec![6, 6, 1], |x| {
            let h = Conv2D::new(2, (3, 3))
                .dilation_rate(2)
                .padding(Padding::Same)
                .apply(x)?;
            let h = AveragePooling2D::new((3, 3))
                .strides((2, 2))
                .padding(Padding::Same)
                .apply(&h)?;
            Dense::new(1).apply(&GlobalMaxPooling2D::new().apply(&h)?)
        }),
        ("conv1d causal dilated, pools", vec![7, 2], |x| {
            let h = Conv1D::new(3, 3)
                .padding(Padding::Causal)
                .dilation_rate(2)
                .activation(Activation::Tanh)
                .apply(x)?;
            let h = AveragePooling1D::new(2).apply(&h)?;
            let h = Conv1D::new(2, 2)
                .strides(2)
                .padding(Padding::Same)
                .apply(&h)?;
            let h = MaxPooling1D::new(2).strides(1).apply(&h)?;
            Dense::new(1).apply(&GlobalAveragePooling1D::new().apply(&h)?)
        }),
    ];
    for (what, shape, net) in nets {
        let input = Input::new(shape.clone());
        let out = net(&input).unwrap();
        let mut model = compiled_f64(&[input], &out, 6);
        let mut dims = vec![3];
        dims.extend(&shape);
        let data =
            Dataset::new(random(&dims, -1.0, 1.0, 7), random(&[3, 1], -1.0, 1.0, 8)).unwrap();
        check_training_gradients(what, &mut model, &data);
    }
}

#[test]
fn normalization_and_merge_gradients_match_finite_differences() {
    // Batch normalization in training mode (batch statistics, over unmasked steps), layer
    // normalization, and the merges, in one graph.
    let x = with_padding(
        random(&[4, 3, 2], -1.0, 2.0, 9),
        &[&[2], &[], &[0], &[1, 2]],
    );
    let input = Input::new([3, 2]);
    let masked = Masking::new(0.0).apply(&input).unwrap();
    let a = Dense::new(3).apply(&masked).unwrap();
    let bn = BatchNormalization::new().apply(&a).unwrap();
    let ln = LayerNormalization::new()
        .apply(&Dense::new(3).apply(&masked).unwrap())
        .unwrap();
    let sum = Add::new().apply_many(&[&bn, &ln]).unwrap();
    let prod = Multiply::new().apply_many(&[&bn, &ln]).unwrap();
    let cat = Concatenate::new().apply_many(&[&sum, &prod]).unwrap();
    let out = Dense::new(2).apply(&cat).unwrap();
    let mut model = compiled_f64(&[input], &out, 10);
    let data = Dataset::new(x, random(&[4, 3, 2], -1.0, 1.0, 11)).unwrap();
    check_training_gradients("bn + ln + merges", &mut model, &data);
}

// ---- Padding invariance ------------------------------------------------------------------------

/// Token ids right-padded with zeros to `steps`.
fn padded(rows: &[&[u32]], steps: usize) -> Tensor {
    let mut v = vec![0f64; rows.len() * steps];
    for (i, r) in rows.iter().enumerate() {
        for (t, &id) in r.iter().enumerate() {
            v[i * steps + t] = id as f64;
        }
    }
    Tensor::from_vec(v, (rows.len(), steps), &Device::Cpu).unwrap()
}

/// Tags (and per-step weights) padded with `fill`, which the mask must cancel.
fn padded_values(rows: &[&[f64]], steps: usize, fill: f64) -> Tensor {
    let mut v = vec![fill; rows.len() * steps];
    for (i, r) in rows.iter().enumerate() {
        for (t, &x) in r.iter().enumerate() {
            v[i * steps + t] = x;
        }
    }
    Tensor::from_vec(v, (rows.len(), steps), &Device::Cpu).unwrap()
}

/// Loss and one SGD step (learning rate 1, so the step is the gradient) of Embedding(mask_zero)
/// → LSTM → per-step Dense with masked sparse crossentropy, on the batch padded to `steps`.
fn loss_and_gradient(
    steps: usize,
    pad_tag: f64,
    pad_weight: f64,
) -> (f64, BTreeMap<String, Vec<f64>>) {
    let ids: [&[u32]; 4] = [&[3, 1, 4, 1, 5], &[9, 2], &[6, 5, 3, 5], &[8]];
    let tags: [&[f64]; 4] = [&[0., 1., 2., 1., 0.], &[2., 2.], &[1., 0., 0., 2.], &[1.]];
    let weights: [&[f64]; 4] = [&[1., 2., 1., 0.5, 1.], &[1., 1.5], &[2., 1., 1., 1.], &[3.]];
    let input = Input::new([steps]);
    let h = Embedding::new(12, 4).mask_zero(true).apply(&input).unwrap();
    let h = Lstm::new(5).return_sequences(true).apply(&h).unwrap();
    let out = Dense::new(3).with_name("tags").apply(&h).unwrap();
    let mut model = Model::builder(&[input], &[out])
        .dtype(DType::F64)
        .seed(21)
        .build()
        .unwrap();
    model
        .compile(
            Compile::new(Sgd::new(1.0))
                .loss(SparseCategoricalCrossentropy::new().from_logits(true)),
        )
        .unwrap();
    let data = Dataset::new(padded(&ids, steps), padded_values(&tags, steps, pad_tag))
        .unwrap()
        .with_sample_weight(padded_values(&weights, steps, pad_weight))
        .unwrap();
    let loss = model.evaluate(&data, 4).unwrap().get("loss").unwrap();
    let before: BTreeMap<String, Vec<f64>> = model
        .weights()
        .into_iter()
        .map(|w| (w.name.clone(), values(w.var.as_tensor())))
        .collect();
    model
        .fit(&data, Fit::new().batch_size(4).shuffle(false).quiet())
        .unwrap();
    let grads = model
        .weights()
        .into_iter()
        .map(|w| {
            let after = values(w.var.as_tensor());
            let g = before[&w.name]
                .iter()
                .zip(&after)
                .map(|(b, a)| b - a)
                .collect();
            (w.name, g)
        })
        .collect();
    (loss, grads)
}

#[test]
fn padding_changes_neither_the_loss_nor_the_gradients() {
    let (loss, grads) = loss_and_gradient(5, 0.0, 1.0);
    // Valid tokens: 5 + 2 + 4 + 1 = 12, padded entries 8; the reference is a batch without
    // any extra padding beyond the longest sequence.
    for (steps, pad_tag, pad_weight) in [(9, 2.0, 7.0), (16, 1.0, 0.0)] {
        let (l, g) = loss_and_gradient(steps, pad_tag, pad_weight);
        assert!(
            (l - loss).abs() <= 1e-12 * loss.abs(),
            "steps {steps}: loss {l} vs {loss}"
        );
        for (name, reference) in &grads {
            for (i, (a, b)) in g[name].iter().zip(reference).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-12 + 1e-10 * b.abs(),
                    "steps {steps}: gradient {name}[{i}] {a} vs {b}"
                );
            }
        }
    }
    // The gradients are real: every weight moves, the embedding of padding id 0 does not.
    let emb = &grads["embedding/embeddings"];
    assert!(emb[..4].iter().all(|g| *g == 0.0), "{:?}", &emb[..4]);
    assert!(grads["lstm/recurrent_kernel"]
        .iter()
        .any(|g| g.abs() > 1e-6));
    assert!(grads["tags/kernel"].iter().any(|g| g.abs() > 1e-6));
}

// ---- Regularizer hooks -------------------------------------------------------------------------

#[test]
fn every_layer_weight_and_activity_regularizer_is_an_added_term() {
    let input = Input::new([6]);
    let e = Embedding::new(8, 3)
        .embeddings_regularizer(L2::new(0.1))
        .with_name("emb")
        .apply(&input)
        .unwrap();
    let c = Conv1D::new(4, 2)
        .kernel_regularizer(L2::new(0.2))
        .bias_regularizer(L1::new(0.3))
        .bias_initializer(Initializer::Ones)
        .activity_regularizer(L1::new(0.05))
        .with_name("conv")
        .apply(&e)
        .unwrap();
    let r = Gru::new(3)
        .kernel_regularizer(L2::new(0.4))
        .recurrent_regularizer(L2::new(0.5))
        .return_sequences(true)
        .with_name("gru")
        .apply(&c)
        .unwrap();
    let l = Lstm::new(2)
        .recurrent_regularizer(L1::new(0.6))
        .bias_regularizer(L2::new(0.7))
        .with_name("lstm")
        .apply(&r)
        .unwrap();
    let n = BatchNormalization::new()
        .gamma_regularizer(L2::new(0.8))
        .with_name("bn")
        .apply(&l)
        .unwrap();
    let mut model = Model::builder(&[input], &[n])
        .dtype(DType::F64)
        .build()
        .unwrap();
    model
        .compile(Compile::new(Sgd::new(0.0)).loss(MeanSquaredError::new()))
        .unwrap();
    let x = Tensor::new(
        &[[1f64, 2., 3., 4., 5., 6.], [7., 6., 5., 0., 0., 0.]],
        &Device::Cpu,
    )
    .unwrap();
    let data = Dataset::new(
        x.clone(),
        Tensor::zeros((2, 2), DType::F64, &Device::Cpu).unwrap(),
    )
    .unwrap();
    let logs = model.evaluate(&data, 2).unwrap();

    let sq = |w: &str| {
        values(model.weight(w).unwrap().var.as_tensor())
            .iter()
            .map(|v| v * v)
            .sum::<f64>()
    };
    let abs = |w: &str| {
        values(model.weight(w).unwrap().var.as_tensor())
            .iter()
            .map(|v| v.abs())
            .sum::<f64>()
    };
    let l2 = 0.1 * sq("emb/embeddings")
        + 0.2 * sq("conv/kernel")
        + 0.4 * sq("gru/kernel")
        + 0.5 * sq("gru/recurrent_kernel")
        + 0.7 * sq("lstm/bias")
        + 0.8 * sq("bn/gamma");
    let l1 = 0.3 * abs("conv/bias") + 0.6 * abs("lstm/recurrent_kernel");
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-10 * b.abs();
    assert!(
        close(logs.get("l2").unwrap(), l2),
        "{:?} vs {l2}",
        logs.get("l2")
    );
    assert!(
        close(logs.get("l1").unwrap(), l1),
        "{:?} vs {l1}",
        logs.get("l1")
    );
    // The activity term: 0.05 · Σ|conv output| / batch size, from the conv output itself.
    let activity = logs.get("activity_l1").unwrap();
    assert!(activity > 0.0);
    let conv_out = {
        let input = Input::new([6]);
        let e2 = Embedding::new(8, 3).with_name("emb").apply(&input).unwrap();
        let c2 = Conv1D::new(4, 2).with_name("conv").apply(&e2).unwrap();
        let twin = Model::builder(&[input], &[c2])
            .dtype(DType::F64)
            .build()
            .unwrap();
        for w in ["emb/embeddings", "conv/kernel", "conv/bias"] {
            twin.weight(w)
                .unwrap()
                .var
                .set(model.weight(w).unwrap().var.as_tensor())
                .unwrap();
        }
        twin.predict(&[x], 2).unwrap().remove(0)
    };
    let expected = 0.05 * values(&conv_out).iter().map(|v| v.abs()).sum::<f64>() / 2.0;
    assert!(close(activity, expected), "{activity} vs {expected}");
    let total = logs.get("loss").unwrap();
    let mse = total - l2 - l1 - activity;
    assert!(mse > 0.0 && mse < total);
}

// ---- Initializers ------------------------------------------------------------------------------

#[test]
fn recurrent_kernels_start_orthogonal_and_lstm_forget_bias_at_one() {
    let input = Input::new([4, 3]);
    let y = Lstm::new(5).with_name("lstm").apply(&input).unwrap();
    let model = Model::builder(&[input], &[y])
        .dtype(DType::F64)
        .seed(9)
        .build()
        .unwrap();
    let r = model
        .weight("lstm/recurrent_kernel")
        .unwrap()
        .var
        .as_tensor()
        .clone();
    assert_eq!(r.dims(), &[5, 20]);
    let gram = r.matmul(&r.t().unwrap()).unwrap().to_vec2::<f64>().unwrap();
    for (i, row) in gram.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            let expected = if i == j { 1.0 } else { 0.0 };
            assert!((v - expected).abs() < 1e-12, "R·Rᵀ[{i}][{j}] = {v}");
        }
    }
    let bias = values(model.weight("lstm/bias").unwrap().var.as_tensor());
    assert_eq!(&bias[..5], &[0.0; 5]);
    assert_eq!(&bias[5..10], &[1.0; 5]);
    assert_eq!(&bias[10..], &[0.0; 10]);
    // Keras' Glorot limit for the kernel [3, 20]: sqrt(6 / 23).
    let k = values(model.weight("lstm/kernel").unwrap().var.as_tensor());
    assert!(k.iter().all(|v| v.abs() <= (6.0f64 / 23.0).sqrt()));
}

// ---- The examples ------------------------------------------------------------------------------

#[test]
fn cnn_classifies_held_out_digits() {
    let s = cnn_digits::run(false).unwrap();
    assert!(s.test_accuracy >= 0.97, "accuracy {}", s.test_accuracy);
}

#[test]
fn sequence_labeller_tags_held_out_sequences_and_ignores_padding() {
    let s = sequence_labelling::run(false).unwrap();
    assert!(
        s.token_accuracy >= 0.98,
        "held-out token accuracy {}",
        s.token_accuracy
    );
    // The masked metric counts real tokens only, exactly as the hand count does.
    assert!(
        (s.metric_accuracy - s.token_accuracy).abs() < 1e-9,
        "{} vs {}",
        s.metric_accuracy,
        s.token_accuracy
    );
    assert!(
        (s.loss_padded - s.loss_unpadded).abs() <= 1e-5 * s.loss_unpadded,
        "{} vs {}",
        s.loss_padded,
        s.loss_unpadded
    );
}
