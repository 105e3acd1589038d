//! Keras 2's crossentropy rule for probability outputs (`ProbabilityRule::Logits`) against the
//! default (`Clipped`, Keras 3 on JAX), on saturated outputs where the two differ, with
//! reference values computed analytically: the log-softmax (or softplus) of the logits behind
//! the activation, and the log of the clipped probability.

use candle_core::{Device, Tensor};
use kiln::losses::LossSpec;
use kiln::prelude::*;

/// `ln Σ exp(z) - z[k]`: the crossentropy of class `k` from logits, in f64.
fn from_logits(z: &[f64], k: usize) -> f64 {
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln() - z[k]
}

/// `-ln clip(p)` with Keras' clip `[1e-7, 1 - 1e-7]` taken in f32, as the loss runs.
fn clipped(p: f64) -> f64 {
    let lo = 1e-7f32 as f64;
    -(p.clamp(lo, (1.0 - 1e-7f32) as f64)).ln()
}

/// Binary crossentropy of a probability 1 (in f32) against label 0 under the clipped rule.
fn saturated_bce() -> f64 {
    -((1.0f32 - (1.0f32 - 1e-7f32)) as f64).ln()
}

fn softmax(z: &[f64]) -> Vec<f64> {
    let s: f64 = z.iter().map(|v| v.exp()).sum();
    z.iter().map(|v| v.exp() / s).collect()
}

/// Logits `[20, 0, -20]` (class 2 true: saturated and wrong) and `[1, 0, -1]` (class 0).
fn three_class_model(with_activation_layer: bool) -> (Model, Tensor) {
    let x = Input::new([2]);
    let y = if with_activation_layer {
        let z = Dense::new(3).with_name("logits").apply(&x).unwrap();
        ActivationLayer::new(Activation::Softmax)
            .with_name("probs")
            .apply(&z)
            .unwrap()
    } else {
        Dense::new(3)
            .activation(Activation::Softmax)
            .with_name("probs")
            .apply(&x)
            .unwrap()
    };
    let model = Model::new(&[x], &[y]).unwrap();
    let dev = Device::Cpu;
    let kernel = Tensor::new(&[[10f32, 0., -10.], [0., 0., 0.]], &dev).unwrap();
    let bias = Tensor::zeros(3, DType::F32, &dev).unwrap();
    model.set_weights(&[kernel, bias]).unwrap();
    let x = Tensor::new(&[[2f32, 0.], [0.1, 0.]], &dev).unwrap();
    (model, x)
}

fn loss_under(model: &mut Model, loss: LossSpec, rule: ProbabilityRule, data: &Dataset) -> f64 {
    model
        .compile(
            Compile::new(Sgd::new(0.1))
                .loss(loss)
                .probability_rule(rule),
        )
        .unwrap();
    model.evaluate(data, 8).unwrap().get("loss").unwrap()
}

#[test]
fn categorical_crossentropy_of_a_saturated_softmax_follows_the_rule() {
    let z1 = [20.0, 0.0, -20.0];
    let z2 = [1.0, 0.0, -1.0];
    let keras2 = (from_logits(&z1, 2) + from_logits(&z2, 0)) / 2.0;
    let keras3 = (clipped(softmax(&z1)[2]) + clipped(softmax(&z2)[0])) / 2.0;
    // The two rules differ by far more than rounding: 40.0 against 16.1 on the first sample.
    assert!(keras2 - keras3 > 10.0, "{keras2} {keras3}");
    for layer in [false, true] {
        let (mut model, x) = three_class_model(layer);
        let dev = Device::Cpu;
        let one_hot = Tensor::new(&[[0f32, 0., 1.], [1., 0., 0.]], &dev).unwrap();
        let labels = Tensor::new(&[[2f32], [0.]], &dev).unwrap();
        let onehot_data = Dataset::new(x.clone(), one_hot).unwrap();
        let sparse_data = Dataset::new(x, labels).unwrap();
        for (loss, data) in [
            (LossSpec::from(CategoricalCrossentropy::new()), &onehot_data),
            (
                LossSpec::from(SparseCategoricalCrossentropy::new()),
                &sparse_data,
            ),
        ] {
            let got2 = loss_under(&mut model, loss.clone(), ProbabilityRule::Logits, data);
            let got3 = loss_under(&mut model, loss, ProbabilityRule::Clipped, data);
            assert!(
                (got2 - keras2).abs() < 1e-5 * keras2,
                "logits rule: {got2} vs {keras2}"
            );
            assert!(
                (got3 - keras3).abs() < 1e-4 * keras3,
                "clipped rule: {got3} vs {keras3}"
            );
        }
    }
}

#[test]
fn binary_crossentropy_of_a_saturated_sigmoid_follows_the_rule() {
    let x = Input::new([1]);
    let y = Dense::new(1)
        .activation(Activation::Sigmoid)
        .apply(&x)
        .unwrap();
    let mut model = Model::new(&[x], &[y]).unwrap();
    let dev = Device::Cpu;
    model
        .set_weights(&[
            Tensor::new(&[[10f32]], &dev).unwrap(),
            Tensor::zeros(1, DType::F32, &dev).unwrap(),
        ])
        .unwrap();
    // Logits 30 (label 0: saturated and wrong) and -0.5 (label 0).
    let data = Dataset::new(
        Tensor::new(&[[3f32], [-0.05]], &dev).unwrap(),
        Tensor::new(&[[0f32], [0.]], &dev).unwrap(),
    )
    .unwrap();
    let softplus = |v: f64| v.max(0.0) + (-v.abs()).exp().ln_1p();
    let keras2 = (softplus(30.0) + softplus(-0.5)) / 2.0;
    // sigmoid(30) is 1 in f32: the clipped rule caps it at 1 - 1e-7 (in f32), so the loss at
    // -ln(1 - f32(1 - 1e-7)) = 15.94.
    let sigmoid = |v: f64| 1.0 / (1.0 + (-v).exp());
    let keras3 = (saturated_bce() + clipped(1.0 - sigmoid(-0.5))) / 2.0;
    let bce = || LossSpec::from(BinaryCrossentropy::new());
    let got2 = loss_under(&mut model, bce(), ProbabilityRule::Logits, &data);
    let got3 = loss_under(&mut model, bce(), ProbabilityRule::Clipped, &data);
    assert!(
        (got2 - keras2).abs() < 1e-5 * keras2,
        "logits rule: {got2} vs {keras2}"
    );
    assert!(
        (got3 - keras3).abs() < 1e-3 * keras3,
        "clipped rule: {got3} vs {keras3}"
    );
}

#[test]
fn the_logits_rule_keeps_the_gradient_of_a_saturated_wrong_prediction() {
    let (mut model, _) = three_class_model(false);
    let dev = Device::Cpu;
    let data = Dataset::new(
        Tensor::new(&[[2f32, 0.]], &dev).unwrap(),
        Tensor::new(&[[0f32, 0., 1.]], &dev).unwrap(),
    )
    .unwrap();
    let cce = || LossSpec::from(CategoricalCrossentropy::new());
    model
        .compile(
            Compile::new(Sgd::new(0.1))
                .loss(cce())
                .probability_rule(ProbabilityRule::Logits),
        )
        .unwrap();
    // d/dW of (logsumexp(z) - z₂) = xᵀ (softmax(z) - y) = [[2, 0, -2], [0, 0, 0]].
    let p = softmax(&[20.0, 0.0, -20.0]);
    let want = [2.0 * p[0], 2.0 * p[1], 2.0 * (p[2] - 1.0), 0.0, 0.0, 0.0];
    let g = model.gradients(&data).unwrap();
    let got = g
        .weight("probs/kernel")
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (w, g) in want.iter().zip(&got) {
        assert!((w - *g as f64).abs() < 1e-5, "{want:?} vs {got:?}");
    }
    // Clipped, the loss is flat there: no gradient reaches the kernel.
    model
        .compile(Compile::new(Sgd::new(0.1)).loss(cce()))
        .unwrap();
    let g = model.gradients(&data).unwrap();
    let flat = g
        .weight("probs/kernel")
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(flat.to_scalar::<f32>().unwrap() < 1e-6);
}

#[test]
fn an_output_without_the_matching_activation_keeps_the_clipped_rule() {
    // Binary crossentropy on a softmax output: Keras 2 undoes sigmoids only.
    let (mut model, x) = three_class_model(false);
    let dev = Device::Cpu;
    let y = Tensor::new(&[[0f32, 0., 1.], [1., 0., 0.]], &dev).unwrap();
    let data = Dataset::new(x, y).unwrap();
    let bce = || LossSpec::from(BinaryCrossentropy::new());
    let a = loss_under(&mut model, bce(), ProbabilityRule::Logits, &data);
    let b = loss_under(&mut model, bce(), ProbabilityRule::Clipped, &data);
    assert_eq!(a, b);
}

/// The loss of `sigmoid(x)` against `y` from a run file with `probability_rule = rule`.
fn run_file_loss(rule: &str, x: f32, y: f32) -> kiln::Result<f64> {
    let text = format!(
        "[model]\ninputs = [{{ name = \"x\", shape = [1] }}]\nlayers = [{{ type = \"activation\", activation = \"sigmoid\" }}]\n[compile]\noptimizer = \"sgd\"\nloss = \"binary_crossentropy\"\nprobability_rule = \"{rule}\"\n"
    );
    let run = kiln::run::RunFile::from_text("rule.toml", &text, std::path::PathBuf::new())?;
    let prepared = run.prepare(None, &Device::Cpu)?;
    let data = Dataset::new(
        Tensor::new(&[[x]], &Device::Cpu)?,
        Tensor::new(&[[y]], &Device::Cpu)?,
    )?;
    Ok(prepared.model.evaluate(&data, 1)?.get("loss").unwrap())
}

#[test]
fn a_run_file_names_the_rule_and_an_unknown_one_is_refused_at_its_line() {
    // Logit 30 with label 0: softplus(30) from the logits, -ln(1 - f32(1 - 1e-7)) clipped.
    let logits = run_file_loss("logits", 30.0, 0.0).unwrap();
    assert!((logits - 30.0).abs() < 1e-4, "{logits}");
    let clip = run_file_loss("clipped", 30.0, 0.0).unwrap();
    assert!((clip - saturated_bce()).abs() < 1e-3 * clip, "{clip}");
    let err = run_file_loss("keras2", 30.0, 0.0).unwrap_err().to_string();
    assert!(err.contains("rule.toml") && err.contains("line 7"), "{err}");
    assert!(
        err.contains("probability_rule") && err.contains("\"logits\""),
        "{err}"
    );
}
