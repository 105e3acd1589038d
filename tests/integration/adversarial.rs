//! Adversarial regularization against closed forms on linear models.

use candle_core::{DType, Device, Tensor};
use kiln::prelude::*;

#[path = "../../examples/fgsm_robustness.rs"]
mod fgsm_robustness;

fn t(v: &[f64], shape: (usize, usize)) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
}

const X: [f64; 12] = [
    0.3, -1.2, 0.5, 1.1, 0.4, -0.7, -0.2, 0.9, 1.5, 0.8, -0.6, 0.1,
];
const Y: [f64; 4] = [0.5, -1.0, 2.0, 0.3];
const SW: [f64; 4] = [1.0, 0.5, 2.0, 1.5];
const W: [f64; 3] = [0.7, -0.4, 0.2];
const B: f64 = 0.1;

/// A linear model y = x·W + B with MSE, in f64; `add_terms` adds its added losses (it gets
/// the output's handle).
fn linear(add_terms: impl FnOnce(&mut Model, &SymbolicTensor)) -> (Model, Dataset) {
    let x = Input::new([3]);
    let y = Dense::new(1).with_name("y").apply(&x).unwrap();
    let mut m = Model::builder(&[x], std::slice::from_ref(&y))
        .dtype(DType::F64)
        .build()
        .unwrap();
    m.weight("y/kernel")
        .unwrap()
        .var
        .set(&t(&W, (3, 1)))
        .unwrap();
    m.weight("y/bias")
        .unwrap()
        .var
        .set(&Tensor::new(&[B], &Device::Cpu).unwrap())
        .unwrap();
    add_terms(&mut m, &y);
    m.compile(Compile::new(Sgd::new(1.0)).loss("mse")).unwrap();
    let data = Dataset::new(t(&X, (4, 3)), t(&Y, (4, 1)))
        .unwrap()
        .with_sample_weight(Tensor::new(&SW, &Device::Cpu).unwrap())
        .unwrap();
    (m, data)
}

fn row(i: usize) -> [f64; 3] {
    [X[3 * i], X[3 * i + 1], X[3 * i + 2]]
}

fn residual(x: &[f64; 3], i: usize) -> f64 {
    x.iter().zip(W).map(|(a, w)| a * w).sum::<f64>() + B - Y[i]
}

/// Σ sw r² / n and its gradients with respect to W and B, for inputs `xs`.
fn mse_and_grads(xs: &[[f64; 3]]) -> (f64, [f64; 3], f64) {
    let n = xs.len() as f64;
    let (mut loss, mut gw, mut gb) = (0.0, [0.0; 3], 0.0);
    for (i, x) in xs.iter().enumerate() {
        let r = residual(x, i);
        loss += SW[i] * r * r / n;
        for j in 0..3 {
            gw[j] += 2.0 * SW[i] * r * x[j] / n;
        }
        gb += 2.0 * SW[i] * r / n;
    }
    (loss, gw, gb)
}

fn close(a: f64, b: f64) {
    assert!((a - b).abs() <= 1e-9 + 1e-9 * b.abs(), "{a} vs {b}");
}

/// x_adv = x + ε · sign(∂L/∂x) = x + ε · sign(r_i) · sign(W).
fn fgsm_inputs(eps: f64) -> Vec<[f64; 3]> {
    (0..4)
        .map(|i| {
            let x = row(i);
            let s = residual(&x, i).signum();
            [0, 1, 2].map(|j| x[j] + eps * s * W[j].signum())
        })
        .collect()
}

#[test]
fn fgsm_term_and_step_match_the_closed_form() {
    let (eps, mult) = (0.1, 0.5);
    let (mut m, data) = linear(|m, _| {
        m.add_loss_term("adversarial", Adversarial::fgsm(eps).multiplier(mult))
            .unwrap()
    });
    let h = m
        .fit(&data, Fit::new().batch_size(4).shuffle(false).quiet())
        .unwrap();
    let clean: Vec<[f64; 3]> = (0..4).map(row).collect();
    let (l_clean, gw_clean, gb_clean) = mse_and_grads(&clean);
    let (l_adv, gw_adv, gb_adv) = mse_and_grads(&fgsm_inputs(eps));
    let logs = h.last().unwrap();
    close(logs.get("adversarial").unwrap(), mult * l_adv);
    close(logs.get("loss").unwrap(), l_clean + mult * l_adv);
    // The step holds x_adv fixed: ∇θ = ∇θ L(x) + mult · ∇θ L(x_adv), applied with lr 1.
    let w: Vec<f64> = m
        .weight("y/kernel")
        .unwrap()
        .var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for j in 0..3 {
        close(w[j], W[j] - gw_clean[j] - mult * gw_adv[j]);
    }
    let b: Vec<f64> = m
        .weight("y/bias")
        .unwrap()
        .var
        .as_tensor()
        .to_vec1()
        .unwrap();
    close(b[0], B - gb_clean - mult * gb_adv);
}

#[test]
fn evaluate_under_attack_uses_the_perturbed_inputs() {
    let (m, data) = linear(|_, _| {});
    let logs = m
        .evaluate_under_attack(&data, 4, &Adversarial::fgsm(0.1))
        .unwrap();
    close(
        logs.get("loss").unwrap(),
        mse_and_grads(&fgsm_inputs(0.1)).0,
    );
}

#[test]
fn pgd_is_projected_into_the_epsilon_ball() {
    // Three sign steps of 0.05 would move 0.15; the infinity ball of radius 0.08 stops them.
    let attack = Adversarial::pgd(0.08, 3, 0.05).norm(PerturbationNorm::Infinity);
    let (m, data) = linear(|_, _| {});
    let logs = m.evaluate_under_attack(&data, 4, &attack).unwrap();
    close(
        logs.get("loss").unwrap(),
        mse_and_grads(&fgsm_inputs(0.08)).0,
    );
}

#[test]
fn l2_direction_is_the_normalized_gradient_and_clip_applies() {
    let eps = 0.2;
    let norm_w = W.iter().map(|w| w * w).sum::<f64>().sqrt();
    let expected: Vec<[f64; 3]> = (0..4)
        .map(|i| {
            let x = row(i);
            let s = residual(&x, i).signum();
            [0, 1, 2].map(|j| (x[j] + eps * s * W[j] / norm_w).clamp(-1.0, 1.0))
        })
        .collect();
    let attack = Adversarial::pgd(eps, 1, eps).clip(-1.0, 1.0);
    let (m, data) = linear(|_, _| {});
    let logs = m.evaluate_under_attack(&data, 4, &attack).unwrap();
    close(logs.get("loss").unwrap(), mse_and_grads(&expected).0);
}

/// `a + b` for two inputs of the same shape: a custom layer, for a two-input model.
struct Sum;

impl Layer for Sum {
    fn kind(&self) -> &'static str {
        "sum"
    }
    fn given_name(&self) -> Option<&str> {
        Some("sum")
    }
    fn output_shape(&self, shapes: &[Vec<usize>]) -> kiln::Result<Vec<usize>> {
        Ok(shapes[0].clone())
    }
    fn call(
        &self,
        inputs: &[Tensor],
        _ctx: &mut kiln::layers::CallContext,
    ) -> kiln::Result<Tensor> {
        Ok((&inputs[0] + &inputs[1])?)
    }
}

#[test]
fn l2_normalization_is_joint_across_inputs_and_feature_masks_hold_features() {
    let (a, b) = (Input::new([2]), Input::new([1]));
    let ya = Dense::new(1)
        .use_bias(false)
        .with_name("da")
        .apply(&a)
        .unwrap();
    let yb = Dense::new(1)
        .use_bias(false)
        .with_name("db")
        .apply(&b)
        .unwrap();
    let out = Sum.apply_many(&[&ya, &yb]).unwrap();
    let mut m = Model::builder(&[a, b], &[out])
        .dtype(DType::F64)
        .build()
        .unwrap();
    let (wa, wb) = ([0.6, -0.8], 2.0);
    m.weight("da/kernel")
        .unwrap()
        .var
        .set(&t(&wa, (2, 1)))
        .unwrap();
    m.weight("db/kernel")
        .unwrap()
        .var
        .set(&t(&[wb], (1, 1)))
        .unwrap();
    m.compile(Compile::new(Sgd::new(0.0)).loss("mse")).unwrap();
    let xa = [0.5, 0.2, -0.3, 0.4];
    let xb = [0.1, -0.9];
    let y = [1.0, -1.0];
    let data = Dataset::multi(vec![t(&xa, (2, 2)), t(&xb, (2, 1))], vec![t(&y, (2, 1))]).unwrap();
    let eps = 0.3;
    let loss_at = |mask_b: f64| {
        // Joint norm over both inputs of (wa, wb·mask_b).
        let joint = (wa[0] * wa[0] + wa[1] * wa[1] + (wb * mask_b).powi(2)).sqrt();
        (0..2)
            .map(|i| {
                let r = xa[2 * i] * wa[0] + xa[2 * i + 1] * wa[1] + xb[i] * wb - y[i];
                let s = r.signum() * eps / joint;
                let r_adv = (xa[2 * i] + s * wa[0]) * wa[0]
                    + (xa[2 * i + 1] + s * wa[1]) * wa[1]
                    + (xb[i] + s * wb * mask_b) * wb
                    - y[i];
                r_adv * r_adv / 2.0
            })
            .sum::<f64>()
    };
    let logs = m
        .evaluate_under_attack(&data, 2, &Adversarial::pgd(eps, 1, eps))
        .unwrap();
    close(logs.get("loss").unwrap(), loss_at(1.0));
    let masks = vec![
        Tensor::new(&[1f64, 1.], &Device::Cpu).unwrap(),
        Tensor::new(&[0f64], &Device::Cpu).unwrap(),
    ];
    let logs = m
        .evaluate_under_attack(
            &data,
            2,
            &Adversarial::pgd(eps, 1, eps).feature_masks(masks),
        )
        .unwrap();
    close(logs.get("loss").unwrap(), loss_at(0.0));
}

#[test]
fn adversarial_settings_are_checked_at_compile() {
    let x = Input::new([3]);
    let y = Dense::new(1).apply(&x).unwrap();
    let mut m = Model::new(&[x], &[y]).unwrap();
    m.add_loss_term("adversarial", Adversarial::fgsm(-0.1))
        .unwrap();
    let msg = m
        .compile(Compile::new(Sgd::new(0.1)).loss("mse"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("epsilon"), "{msg}");
    let x = Input::new([3]);
    let y = Dense::new(1).apply(&x).unwrap();
    let mut m = Model::new(&[x], &[y]).unwrap();
    m.add_loss_term("adversarial", Adversarial::fgsm(0.1))
        .unwrap();
    let msg = m
        .compile(Compile::new(Sgd::new(0.1)))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("needs a compile-time loss"), "{msg}");
}

#[test]
fn fgsm_training_keeps_accuracy_under_attack() {
    let s = fgsm_robustness::run(false).unwrap();
    assert!(
        s.plain_clean >= 0.94 && s.robust_clean >= 0.93,
        "clean {} / {}",
        s.plain_clean,
        s.robust_clean
    );
    assert!(
        s.robust_attacked >= s.plain_attacked + 0.2,
        "under attack: plain {} vs robust {}",
        s.plain_attacked,
        s.robust_attacked
    );
}

#[test]
fn fgsm_term_covers_every_output_with_its_loss_weight() {
    // Two linear heads on one input; the adversarial term is multiplier · Σ weight_i · L_i(x_adv).
    let x = Input::new([3]);
    let a = Dense::new(1)
        .use_bias(false)
        .with_name("a")
        .apply(&x)
        .unwrap();
    let b = Dense::new(1)
        .use_bias(false)
        .with_name("b")
        .apply(&x)
        .unwrap();
    let mut m = Model::builder(&[x], &[a, b])
        .dtype(DType::F64)
        .build()
        .unwrap();
    m.weight("a/kernel")
        .unwrap()
        .var
        .set(&t(&W, (3, 1)))
        .unwrap();
    let wb = [-0.5, 0.3, 0.9];
    m.weight("b/kernel")
        .unwrap()
        .var
        .set(&t(&wb, (3, 1)))
        .unwrap();
    m.add_loss_term("adversarial", Adversarial::fgsm(0.1).multiplier(0.5))
        .unwrap();
    m.compile(
        Compile::new(Sgd::new(0.0))
            .loss("mse")
            .loss_weight_for("b", 2.0),
    )
    .unwrap();
    let yb = [0.1, 0.2, -0.3, 0.4];
    let data = Dataset::multi(vec![t(&X, (4, 3))], vec![t(&Y, (4, 1)), t(&yb, (4, 1))]).unwrap();
    let h = m
        .fit(&data, Fit::new().batch_size(4).shuffle(false).quiet())
        .unwrap();
    // ∂/∂x of mean(r_a²) + 2·mean(r_b²) = (2/4)·(r_a·W + 2·r_b·wb): take its sign per feature.
    let mut adv = 0.0;
    for i in 0..4 {
        let x = row(i);
        let ra = x.iter().zip(W).map(|(p, q)| p * q).sum::<f64>() - Y[i];
        let rb = x.iter().zip(wb).map(|(p, q)| p * q).sum::<f64>() - yb[i];
        let xa: Vec<f64> = (0..3)
            .map(|j| x[j] + 0.1 * (ra * W[j] + 2.0 * rb * wb[j]).signum())
            .collect();
        let ra2 = xa.iter().zip(W).map(|(p, q)| p * q).sum::<f64>() - Y[i];
        let rb2 = xa.iter().zip(wb).map(|(p, q)| p * q).sum::<f64>() - yb[i];
        adv += (ra2 * ra2 + 2.0 * rb2 * rb2) / 4.0;
    }
    close(h.last().unwrap().get("adversarial").unwrap(), 0.5 * adv);
}

#[test]
fn the_attack_follows_the_labeled_loss_only() {
    // An added term that depends on the input through the output would flip the direction of
    // some features if it were part of the attacked loss; as in Neural Structured Learning, the
    // attack differentiates the compiled losses only. Its own gradient still reaches the weights.
    let (eps, mult) = (0.1, 0.5);
    let (mut m, data) = linear(|m, y| {
        let handle = y.clone();
        m.add_loss("pull", move |ts: &Tensors| {
            Ok((ts.get(&handle)?.mean_all()? * -10.0)?)
        })
        .unwrap();
        m.add_loss_term("adversarial", Adversarial::fgsm(eps).multiplier(mult))
            .unwrap();
    });
    let h = m
        .fit(&data, Fit::new().batch_size(4).shuffle(false).quiet())
        .unwrap();
    let (_, gw_clean, gb_clean) = mse_and_grads(&(0..4).map(row).collect::<Vec<_>>());
    let (l_adv, gw_adv, gb_adv) = mse_and_grads(&fgsm_inputs(eps));
    close(h.last().unwrap().get("adversarial").unwrap(), mult * l_adv);
    // d(pull)/dW = -10 · mean(x), d(pull)/db = -10.
    let mean_x: Vec<f64> = (0..3)
        .map(|j| (0..4).map(|i| row(i)[j]).sum::<f64>() / 4.0)
        .collect();
    let w: Vec<f64> = m
        .weight("y/kernel")
        .unwrap()
        .var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for j in 0..3 {
        close(
            w[j],
            W[j] - gw_clean[j] - mult * gw_adv[j] + 10.0 * mean_x[j],
        );
    }
    let b: Vec<f64> = m
        .weight("y/bias")
        .unwrap()
        .var
        .as_tensor()
        .to_vec1()
        .unwrap();
    close(b[0], B - gb_clean - mult * gb_adv + 10.0);
}
