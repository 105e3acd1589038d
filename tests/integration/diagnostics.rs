//! Gradient diagnostics where a user trains outside `fit`'s training batches: the logs of
//! `train_on_batch` and the validation data of `fit`. Every value is checked against the
//! per-term gradients computed by hand from `Model::gradients` on the same batch (f64):
//! each term's gradient is the difference of the total's gradients of two compilations that
//! differ by that term alone.

use kiln::candle::{DType, Device, Tensor};
use kiln::prelude::*;

/// The parity head's fixed loss weight, and the FGSM term's multiplier.
const PARITY_WEIGHT: f64 = 0.5;
const FGSM_MULTIPLIER: f64 = 0.7;

/// Two heads over a tanh trunk with an L2 penalty on its kernel, and optionally FGSM, in f64
/// from seed 3; `digit` and `parity` are the heads' loss weights. No dropout nor batch
/// statistics, so a training-mode pass (`Model::gradients`) equals an inference-mode one.
fn model(digit: f64, parity: f64, fgsm: bool) -> Model {
    let x = Input::new([6]);
    let h = Dense::new(5)
        .with_name("trunk")
        .activation(Activation::Tanh)
        .kernel_regularizer(L2::new(0.03))
        .apply(&x)
        .unwrap();
    let d = Dense::new(3).with_name("digit").apply(&h).unwrap();
    let p = Dense::new(1).with_name("parity").apply(&h).unwrap();
    let mut model = Model::builder(&[&x], &[&d, &p])
        .seed(3)
        .dtype(DType::F64)
        .build()
        .unwrap();
    if fgsm {
        model
            .add_loss_term(
                "adversarial",
                Adversarial::fgsm(0.1).multiplier(FGSM_MULTIPLIER),
            )
            .unwrap();
    }
    model
        .compile(
            Compile::new(Sgd::new(0.1))
                .loss_for(
                    "digit",
                    SparseCategoricalCrossentropy::new().from_logits(true),
                )
                .loss_for("parity", BinaryCrossentropy::new().from_logits(true))
                .loss_weight_for("digit", digit)
                .loss_weight_for("parity", parity),
        )
        .unwrap();
    model
}

/// `n` samples, `offset` giving other inputs and labels.
fn data(n: usize, offset: usize) -> Dataset {
    let d = Device::Cpu;
    let xs: Vec<f64> = (0..n * 6)
        .map(|i| (((i + 6 * offset) * 37 % 23) as f64 - 11.0) / 7.0)
        .collect();
    let digits: Vec<f64> = (0..n).map(|i| ((i + offset) % 3) as f64).collect();
    let odd: Vec<f64> = (0..n).map(|i| (((i + offset) / 2) % 2) as f64).collect();
    Dataset::multi(
        vec![Tensor::from_vec(xs, (n, 6), &d).unwrap()],
        vec![
            Tensor::from_vec(digits, n, &d).unwrap(),
            Tensor::from_vec(odd, (n, 1), &d).unwrap(),
        ],
    )
    .unwrap()
}

/// The total's gradient over `shared`, flattened, from `Model::gradients` on `batch`.
fn total(model: &Model, batch: &Dataset, shared: &[&str]) -> Vec<f64> {
    let g = model.gradients(batch).unwrap();
    shared
        .iter()
        .flat_map(|name| {
            let t = g.weight(name).unwrap();
            t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
        })
        .collect()
}

fn minus(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Each term's gradient over the shared weights on `batch`, by hand, in the history's order
/// (`digit_loss`, `parity_loss`, `l2`, then `adversarial`): the penalty is the gradient with
/// both loss weights 0; a head's term, the gradient with its weight on less the penalty's; the
/// adversarial term, the gradient with FGSM less the one without.
fn by_hand(batch: &Dataset, fgsm: bool) -> Vec<(String, Vec<f64>)> {
    let shared: Vec<&str> = match fgsm {
        // FGSM's term reaches every weight.
        true => vec![
            "trunk/kernel",
            "trunk/bias",
            "digit/kernel",
            "digit/bias",
            "parity/kernel",
            "parity/bias",
        ],
        false => vec!["trunk/kernel", "trunk/bias"],
    };
    let l2 = total(&model(0.0, 0.0, false), batch, &shared);
    let digit = minus(&total(&model(1.0, 0.0, false), batch, &shared), &l2);
    let parity = minus(
        &total(&model(0.0, PARITY_WEIGHT, false), batch, &shared),
        &l2,
    );
    let mut terms = vec![
        ("digit_loss".to_string(), digit),
        ("parity_loss".to_string(), parity),
        ("l2".to_string(), l2),
    ];
    if fgsm {
        let without = total(&model(1.0, PARITY_WEIGHT, false), batch, &shared);
        let with = total(&model(1.0, PARITY_WEIGHT, true), batch, &shared);
        terms.push(("adversarial".to_string(), minus(&with, &without)));
    }
    terms
}

/// The diagnostics by hand: every term's norm and every pair's cosine, by log key.
fn diagnostics_by_hand(batch: &Dataset, fgsm: bool) -> Vec<(String, f64)> {
    let terms = by_hand(batch, fgsm);
    let mut out: Vec<(String, f64)> = terms
        .iter()
        .map(|(name, g)| (format!("grad_norm/{name}"), dot(g, g).sqrt()))
        .collect();
    for (i, (a, ga)) in terms.iter().enumerate() {
        for (b, gb) in &terms[i + 1..] {
            let cos = dot(ga, gb) / (dot(ga, ga) * dot(gb, gb)).sqrt();
            out.push((format!("grad_cos/{a}/{b}"), cos));
        }
    }
    out
}

fn assert_close(key: &str, got: Option<f64>, expected: f64) {
    let got = got.unwrap_or_else(|| panic!("no {key}"));
    assert!(
        (got - expected).abs() <= 1e-10 * expected.abs().max(1e-3),
        "{key}: {got} by the trainer, {expected} by hand"
    );
}

fn weights(model: &Model) -> Vec<Vec<u64>> {
    model
        .weights()
        .iter()
        .map(|w| {
            let v: Vec<f64> = w.var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        })
        .collect()
}

/// `train_on_batch` with diagnostics on logs the batch's norms and cosines, equal to those by
/// hand (FGSM included); it updates the weights exactly as with them off, and logs the same
/// loss breakdown besides.
#[test]
fn train_on_batch_logs_the_batch_diagnostics() {
    for fgsm in [false, true] {
        let batch = data(9, 0);
        let expected = diagnostics_by_hand(&batch, fgsm);
        let mut on = model(1.0, PARITY_WEIGHT, fgsm);
        assert!(!on.gradient_diagnostics());
        on.set_gradient_diagnostics(true);
        assert!(on.gradient_diagnostics());
        let logs = on.train_on_batch(&batch).unwrap();
        let keys: Vec<&str> = logs
            .iter()
            .map(|(k, _)| k)
            .filter(|k| k.starts_with("grad_"))
            .collect();
        assert_eq!(keys.len(), expected.len(), "{keys:?}");
        for (key, value) in &expected {
            assert_close(key, logs.get(key), *value);
        }
        let mut off = model(1.0, PARITY_WEIGHT, fgsm);
        let plain = off.train_on_batch(&batch).unwrap();
        assert_eq!(weights(&on), weights(&off));
        for (k, v) in plain.iter() {
            assert_eq!(logs.get(k), Some(v), "{k}");
        }
        // Off again: the logs hold no diagnostics.
        on.set_gradient_diagnostics(false);
        let again = on.train_on_batch(&batch).unwrap();
        assert!(again.iter().all(|(k, _)| !k.starts_with("grad_")));
    }
}

/// With validation diagnostics on, every epoch logs `val_grad_norm/<term>` and
/// `val_grad_cos/<a>/<b>`: the means over the validation batches (7 samples in batches of 4
/// and 3), weighted by their sizes, of the values by hand. Training diagnostics stay off
/// unless asked, and what is learned does not change.
#[test]
fn validation_diagnostics_are_the_held_out_batches_means() {
    for fgsm in [false, true] {
        let train = data(10, 0);
        let val = data(7, 10);
        let first = diagnostics_by_hand(&val.slice(0, 4).unwrap(), fgsm);
        let second = diagnostics_by_hand(&val.slice(4, 3).unwrap(), fgsm);
        let mut m = model(1.0, PARITY_WEIGHT, fgsm);
        // No update: every epoch's validation sees the weights the values by hand saw.
        m.set_learning_rate(0.0).unwrap();
        let fit = Fit::new()
            .epochs(2)
            .batch_size(4)
            .quiet()
            .validation_data(val.clone())
            .validation_gradient_diagnostics(true);
        let history = m.fit(&train, fit).unwrap();
        for ((key, a), (_, b)) in first.iter().zip(&second) {
            let mean = (4.0 * a + 3.0 * b) / 7.0;
            let series = history.get(&format!("val_{key}")).unwrap();
            assert_eq!(series.len(), 2);
            for v in series {
                assert_close(&format!("val_{key}"), Some(v), mean);
            }
            assert!(
                history.get(key).is_none(),
                "{key} without training diagnostics"
            );
        }
        let val_keys = history
            .series()
            .into_keys()
            .filter(|k| k.starts_with("val_grad_"))
            .count();
        assert_eq!(val_keys, first.len());

        // Both on, with updates: the same weights and losses as with both off.
        let run = |on: bool| {
            let mut m = model(1.0, PARITY_WEIGHT, fgsm);
            let fit = Fit::new()
                .epochs(2)
                .batch_size(4)
                .quiet()
                .validation_data(val.clone())
                .gradient_diagnostics(on)
                .validation_gradient_diagnostics(on);
            let h = m.fit(&train, fit).unwrap();
            (h, weights(&m))
        };
        let (h_on, w_on) = run(true);
        let (h_off, w_off) = run(false);
        assert_eq!(w_on, w_off);
        let mut plain = h_on.clone();
        for key in h_on.series().keys().filter(|k| k.contains("grad_")) {
            plain = plain.without(key);
        }
        assert_eq!(plain.without("epoch_time_s"), h_off.without("epoch_time_s"));
        assert!(h_on.get("grad_norm/l2").is_some() && h_on.get("val_grad_norm/l2").is_some());
    }
}

/// Validation diagnostics without validation data are refused, saying what to give.
#[test]
fn validation_diagnostics_need_validation_data() {
    let mut m = model(1.0, PARITY_WEIGHT, false);
    let fit = Fit::new().quiet().validation_gradient_diagnostics(true);
    let e = m.fit(&data(4, 0), fit).unwrap_err().to_string();
    assert!(
        e.contains("validation_gradient_diagnostics") && e.contains("validation_split"),
        "{e}"
    );
}
