//! The Normalization layer: adapt's statistics and the outputs against real Keras 3.15.1
//! (tests/fixtures/keras_normalization.json, made by tests/fixtures/make_normalization_cases.py),
//! and its statistics staying bit-identical through `fit` with every optimizer, the fused
//! CPU paths and an adversarial term, and through a save and a load.

use candle_core::{DType, Device, Tensor};
use kiln::optimizers::{Adam, AdamW, Optimizer, RmsProp, Sgd};
use kiln::prelude::*;
use serde_json::Value;
use std::path::Path;

fn fixture() -> Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keras_normalization.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("JSON")
}

fn flat(v: &Value, out: &mut Vec<f64>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flat(i, out)),
        Value::Number(n) => out.push(n.as_f64().expect("number")),
        other => panic!("not a number: {other}"),
    }
}

fn tensor(v: &Value, shape: &Value) -> Tensor {
    let mut values = Vec::new();
    flat(v, &mut values);
    let shape: Vec<usize> = shape
        .as_array()
        .expect("shape")
        .iter()
        .map(|d| d.as_u64().expect("dim") as usize)
        .collect();
    let values: Vec<f32> = values.into_iter().map(|x| x as f32).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).expect("tensor")
}

/// |a - b| <= tol · max(1, |b|), element by element.
fn assert_close(what: &str, got: &[f64], expected: &[f64], tol: f64) {
    assert_eq!(got.len(), expected.len(), "{what}: lengths");
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert!(
            (g - e).abs() <= tol * e.abs().max(1.0),
            "{what}[{i}]: kiln {g}, Keras {e}"
        );
    }
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .and_then(|t| t.to_dtype(DType::F64))
        .and_then(|t| t.to_vec1::<f64>())
        .expect("values")
}

/// The shape of a nested JSON array.
fn nested_shape(v: &Value) -> Value {
    let mut dims = Vec::new();
    let mut at = v;
    while let Value::Array(a) = at {
        dims.push(a.len());
        match a.first() {
            Some(first) => at = first,
            None => break,
        }
    }
    Value::from(dims)
}

fn layer_of(case: &Value) -> Normalization {
    match &case["axis"] {
        Value::Null => Normalization::new().all_axes(),
        Value::Number(n) => Normalization::new().axis(n.as_i64().expect("axis") as isize),
        Value::Array(a) => Normalization::new().axes(
            &a.iter()
                .map(|n| n.as_i64().expect("axis") as isize)
                .collect::<Vec<_>>(),
        ),
        other => panic!("axis {other}"),
    }
    .invert(case["invert"].as_bool().expect("invert"))
    .with_name("norm")
}

fn applied(layer: Normalization, inputs: &Tensor) -> kiln::Result<(Model, Vec<f64>)> {
    let x = Input::new(inputs.dims()[1..].to_vec());
    let y = layer.apply(&x)?;
    let model = Model::new(&[x], &[y])?;
    let out = model.predict(std::slice::from_ref(inputs), 64)?;
    assert_eq!(out[0].dims(), inputs.dims());
    Ok((model, values(&out[0])))
}

/// Two checks per case: the statistics `adapt` stores equal Keras' `adapt_mean` and
/// `adapt_variance`; and with Keras' statistics (adapted or given) the layer's output equals
/// Keras' output. The adapted layer's own output is compared too, with a tolerance for the
/// cancellation in `x - mean` in float32 (a feature near -50 with a standard deviation of 0.01
/// keeps about 3 significant digits, in Keras as in kiln).
#[test]
fn adapt_and_outputs_match_keras() -> kiln::Result<()> {
    let fx = fixture();
    assert_eq!(
        fx["epsilon"].as_f64(),
        Some(kiln::layers::NORMALIZATION_EPSILON)
    );
    let cases = fx["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 9);
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let inputs = tensor(&case["inputs"], &case["input_shape"]);
        let mut expected = Vec::new();
        flat(&case["output"], &mut expected);
        let (mean_key, variance_key) = match case.get("adapt") {
            Some(_) => ("adapt_mean", "adapt_variance"),
            None => ("mean", "variance"),
        };
        if case.get("adapt").is_some() {
            let adapted = layer_of(case).adapt(&tensor(&case["adapt"], &case["adapt_shape"]))?;
            let (model, out) = applied(adapted, &inputs)?;
            let mut mean = Vec::new();
            flat(&case["adapt_mean"], &mut mean);
            let mut variance = Vec::new();
            flat(&case["adapt_variance"], &mut variance);
            let got_mean = values(model.weight("norm/mean")?.var.as_tensor());
            let got_var = values(model.weight("norm/variance")?.var.as_tensor());
            assert_close(&format!("{name} mean"), &got_mean, &mean, 1e-6);
            assert_close(&format!("{name} variance"), &got_var, &variance, 1e-5);
            let count = values(model.weight("norm/count")?.var.as_tensor());
            let samples: usize = shape(&case["adapt_shape"]).iter().product();
            assert_eq!(count, vec![(samples / mean.len()) as f64], "{name} count");
            assert_close(&format!("{name} adapted output"), &out, &expected, 2e-3);
        }
        let mean = tensor(&case[mean_key], &nested_shape(&case[mean_key]));
        let variance = tensor(&case[variance_key], &nested_shape(&case[variance_key]));
        let given = layer_of(case).mean_variance(&mean, &variance)?;
        let (_, out) = applied(given, &inputs)?;
        assert_close(&format!("{name} output"), &out, &expected, 2e-6);
    }
    Ok(())
}

fn shape(v: &Value) -> Vec<usize> {
    v.as_array()
        .expect("shape")
        .iter()
        .map(|d| d.as_u64().expect("dim") as usize)
        .collect()
}

type MakeOptimizer = fn() -> Box<dyn Optimizer>;

fn optimizers() -> Vec<(&'static str, MakeOptimizer)> {
    vec![
        ("sgd", || Box::new(Sgd::new(0.05))),
        ("sgd nesterov", || {
            Box::new(Sgd::new(0.05).momentum(0.9).nesterov(true))
        }),
        ("adam", || Box::new(Adam::new(0.01))),
        ("adam weight decay", || {
            Box::new(Adam::new(0.01).weight_decay(0.1))
        }),
        ("adamw", || Box::new(AdamW::new(0.01).weight_decay(0.1))),
        ("rmsprop", || Box::new(RmsProp::new(0.01).momentum(0.5))),
    ]
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("f32")
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

#[test]
fn statistics_stay_bit_identical_through_fit_with_every_optimizer() -> kiln::Result<()> {
    let d = Device::Cpu;
    // 64 samples, 6 features of very different scales.
    let raw: Vec<f32> = (0..64 * 6)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * (1 + i % 6) as f32 * 10.0)
        .collect();
    let xs = Tensor::from_vec(raw, (64, 6), &d)?;
    let ys = xs.sum_keepdim(1)?.affine(1e-3, 0.0)?.tanh()?;
    let data = Dataset::new(xs.clone(), ys)?;
    for (name, optimizer) in optimizers() {
        for adversarial in [false, true] {
            let x = Input::new([6]);
            let n = Normalization::new()
                .with_name("norm")
                .adapt(&xs)?
                .apply(&x)?;
            let h = Dense::new(16)
                .activation(Activation::Relu)
                .kernel_regularizer(kiln::regularizers::L2::new(1e-3))
                .apply(&n)?;
            let y = Dense::new(1).apply(&h)?;
            let mut model = Model::new(&[x], &[y])?;
            if adversarial {
                model.add_loss_term("fgsm", Adversarial::fgsm(0.1))?;
            }
            model.compile(Compile::from_boxed(optimizer()).loss("mse"))?;
            let before: Vec<Vec<u32>> = ["norm/mean", "norm/variance", "norm/count"]
                .iter()
                .map(|w| Ok(bits(model.weight(w)?.var.as_tensor())))
                .collect::<kiln::Result<_>>()?;
            let kernel_before = bits(model.weight("dense/kernel")?.var.as_tensor());
            model.fit(&data, Fit::new().epochs(3).batch_size(16).quiet())?;
            for (w, b) in ["norm/mean", "norm/variance", "norm/count"]
                .iter()
                .zip(&before)
            {
                assert_eq!(
                    &bits(model.weight(w)?.var.as_tensor()),
                    b,
                    "{w} changed under {name} (adversarial {adversarial})"
                );
                assert!(!model.weight(w)?.trainable());
            }
            // The trainable weights did move: the optimizer ran.
            assert_ne!(
                bits(model.weight("dense/kernel")?.var.as_tensor()),
                kernel_before
            );
        }
    }
    Ok(())
}

#[test]
fn statistics_travel_with_the_saved_weights() -> kiln::Result<()> {
    let d = Device::Cpu;
    let xs = Tensor::new(&[[1f32, 100.], [3., 300.], [8., 200.]], &d)?;
    let build = |adapt: bool| -> kiln::Result<Model> {
        let x = Input::new([2]);
        let layer = Normalization::new().with_name("norm");
        let layer = if adapt { layer.adapt(&xs)? } else { layer };
        let y = layer.apply(&x)?;
        Model::new(&[x], &[y])
    };
    let adapted = build(true)?;
    let dir = std::env::temp_dir().join(format!("kiln-normalization-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("w.safetensors");
    adapted.save_weights(&path)?;
    let fresh = build(false)?;
    // Not adapted: mean 0 and variance 1, as Keras starts.
    assert_eq!(
        values(&fresh.predict(std::slice::from_ref(&xs), 3)?[0]),
        values(&xs)
    );
    fresh.load_weights(&path)?;
    let a = adapted.predict(std::slice::from_ref(&xs), 3)?;
    let b = fresh.predict(std::slice::from_ref(&xs), 3)?;
    assert_eq!(bits(&a[0]), bits(&b[0]));
    // Feature 0: mean 4, population variance 26/3.
    let first = values(&a[0])[0];
    assert!(
        (first - (1.0 - 4.0) / (26.0f64 / 3.0).sqrt()).abs() < 1e-6,
        "{first}"
    );
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn model_of(layer: Normalization, features: usize) -> kiln::Result<Model> {
        let x = Input::new([features]);
        let y = layer.apply(&x)?;
        Model::builder(&[x], &[y]).dtype(DType::F64).build()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// On the data it was adapted on, the layer's output has mean 0 and variance 1 in every
        /// feature that varies (0 in a constant one), and the inverse layer with the same
        /// statistics gives the data back.
        #[test]
        fn adapted_outputs_are_standard_and_invert_back(
            rows in 2usize..40,
            features in 1usize..6,
            seed in any::<u64>(),
            scale in -3i32..4,
        ) {
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut v: Vec<f64> = (0..rows * features)
                .map(|_| rng.random::<f64>() * 10f64.powi(scale) - 3.0)
                .collect();
            // The last feature constant.
            for r in 0..rows {
                v[r * features + features - 1] = 2.5;
            }
            let xs = Tensor::from_vec(v.clone(), (rows, features), &Device::Cpu)?;
            let forward = model_of(Normalization::new().adapt(&xs)?, features)?;
            let out = forward.predict(std::slice::from_ref(&xs), rows)?[0].to_vec2::<f64>()?;
            for j in 0..features {
                let col: Vec<f64> = out.iter().map(|r| r[j]).collect();
                let mean = col.iter().sum::<f64>() / rows as f64;
                let var = col.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / rows as f64;
                prop_assert!(mean.abs() < 1e-9, "feature {j}: mean {mean}");
                match j == features - 1 {
                    true => prop_assert_eq!(var, 0.0),
                    // Features whose spread is below 1e-7 are divided by Keras' epsilon instead.
                    false if v.iter().skip(j).step_by(features).any(|&a| (a - v[j]).abs() > 1e-5) => {
                        prop_assert!((var - 1.0).abs() < 1e-6, "feature {j}: variance {var}");
                    }
                    false => {}
                }
            }
            let mean = forward.weight("normalization/mean")?.var.as_tensor().clone();
            let variance = forward.weight("normalization/variance")?.var.as_tensor().clone();
            let back = model_of(
                Normalization::new().invert(true).mean_variance(&mean, &variance)?,
                features,
            )?;
            let standardized = Tensor::new(out, &Device::Cpu)?;
            let again = back.predict(&[standardized], rows)?[0].flatten_all()?.to_vec1::<f64>()?;
            for (a, b) in again.iter().zip(&v) {
                prop_assert!((a - b).abs() <= 1e-9 * b.abs().max(1.0), "{a} vs {b}");
            }
        }
    }
}
