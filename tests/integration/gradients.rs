//! Gradients against central finite differences, in f64, and their finiteness at the edges.

use candle_core::{DType, Device, Tensor, Var};
use kiln::losses::*;
use kiln::prelude::*;
use rand::{Rng, SeedableRng};

fn random(shape: (usize, usize), lo: f64, hi: f64, seed: u64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f64> = (0..shape.0 * shape.1)
        .map(|_| rng.random_range(lo..hi))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn one_hot_f64(labels: &[usize], classes: usize) -> Tensor {
    let mut v = vec![0f64; labels.len() * classes];
    for (i, &l) in labels.iter().enumerate() {
        v[i * classes + l] = 1.0;
    }
    Tensor::from_vec(v, (labels.len(), classes), &Device::Cpu).unwrap()
}

/// The reduced loss, weighted, as a function of `y_pred`.
fn value(loss: &dyn Loss, y_true: &Tensor, y_pred: &Tensor, sw: &Tensor) -> f64 {
    loss.reduced(y_true, y_pred, Some(sw), None)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn check_against_finite_differences(loss: &dyn Loss, y_true: &Tensor, y_pred: &Tensor) {
    let n = y_pred.dims()[0];
    let sw = random((n, 1), 0.5, 2.0, 99).squeeze(1).unwrap();
    let var = Var::from_tensor(y_pred).unwrap();
    let total = loss
        .reduced(y_true, var.as_tensor(), Some(&sw), None)
        .unwrap();
    let grads = total.backward().unwrap();
    let analytic: Vec<f64> = grads
        .get(var.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let base: Vec<f64> = y_pred.flatten_all().unwrap().to_vec1().unwrap();
    let h = 1e-6;
    for i in 0..base.len() {
        let shifted = |d: f64| {
            let mut v = base.clone();
            v[i] += d;
            Tensor::from_vec(v, y_pred.shape(), &Device::Cpu).unwrap()
        };
        let fd = (value(loss, y_true, &shifted(h), &sw) - value(loss, y_true, &shifted(-h), &sw))
            / (2.0 * h);
        assert!(
            (analytic[i] - fd).abs() <= 1e-6 + 1e-4 * fd.abs(),
            "{}: d/dy_pred[{i}] analytic {} vs finite difference {fd}",
            loss.name(),
            analytic[i]
        );
    }
}

#[test]
fn regression_losses_match_finite_differences() {
    let y_true = random((6, 3), 0.1, 2.0, 1);
    let y_pred = random((6, 3), 0.1, 2.0, 2);
    let losses: Vec<Box<dyn Loss>> = vec![
        Box::new(MeanSquaredError::new()),
        Box::new(MeanAbsoluteError::new()),
        Box::new(MeanAbsolutePercentageError::new()),
        Box::new(MeanSquaredLogarithmicError::new()),
        Box::new(Huber::new().delta(0.3)),
        Box::new(LogCosh::new()),
    ];
    for loss in &losses {
        check_against_finite_differences(loss.as_ref(), &y_true, &y_pred);
    }
}

#[test]
fn binary_losses_match_finite_differences() {
    let y_true = random((5, 4), 0.0, 1.0, 3)
        .ge(0.5)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let probs = random((5, 4), 0.05, 0.95, 4);
    let logits = random((5, 4), -4.0, 4.0, 5);
    let cases: Vec<(Box<dyn Loss>, &Tensor)> = vec![
        (Box::new(BinaryCrossentropy::new()), &probs),
        (
            Box::new(BinaryCrossentropy::new().label_smoothing(0.1)),
            &probs,
        ),
        (
            Box::new(BinaryCrossentropy::new().from_logits(true)),
            &logits,
        ),
        (Box::new(BinaryFocalCrossentropy::new().gamma(2.0)), &probs),
        (
            Box::new(
                BinaryFocalCrossentropy::new()
                    .apply_class_balancing(true)
                    .from_logits(true),
            ),
            &logits,
        ),
    ];
    for (loss, y_pred) in &cases {
        check_against_finite_differences(loss.as_ref(), &y_true, y_pred);
    }
}

#[test]
fn categorical_losses_match_finite_differences() {
    let labels = [0usize, 2, 1, 3, 3];
    let y_true = one_hot_f64(&labels, 4);
    let logits = random((5, 4), -3.0, 3.0, 6);
    let probs = kiln::Activation::Softmax.apply(&logits).unwrap();
    let sparse = Tensor::new(&[0f64, 2., 1., 3., 3.], &Device::Cpu).unwrap();
    let cases: Vec<(Box<dyn Loss>, &Tensor, &Tensor)> = vec![
        (Box::new(CategoricalCrossentropy::new()), &y_true, &probs),
        (
            Box::new(
                CategoricalCrossentropy::new()
                    .from_logits(true)
                    .label_smoothing(0.2),
            ),
            &y_true,
            &logits,
        ),
        (
            Box::new(CategoricalFocalCrossentropy::new()),
            &y_true,
            &probs,
        ),
        (
            Box::new(
                CategoricalFocalCrossentropy::new()
                    .from_logits(true)
                    .gamma(3.0),
            ),
            &y_true,
            &logits,
        ),
        (
            Box::new(SparseCategoricalCrossentropy::new()),
            &sparse,
            &probs,
        ),
        (
            Box::new(SparseCategoricalCrossentropy::new().from_logits(true)),
            &sparse,
            &logits,
        ),
        (
            Box::new(
                SparseCategoricalCrossentropy::new()
                    .from_logits(true)
                    .ignore_class(Some(3)),
            ),
            &sparse,
            &logits,
        ),
    ];
    for (loss, t, p) in &cases {
        check_against_finite_differences(loss.as_ref(), t, p);
    }
}

fn all_finite(t: &Tensor) -> bool {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite())
}

#[test]
fn gradients_stay_finite_at_the_clipping_edges() {
    let y_true = Tensor::new(&[[1f64, 0., 0.], [0., 1., 0.]], &Device::Cpu).unwrap();
    let hard_probs = Tensor::new(&[[0f64, 1., 0.], [0., 1., 0.]], &Device::Cpu).unwrap();
    let huge_logits =
        Tensor::new(&[[-100f64, 100., 0.], [100., -100., 100.]], &Device::Cpu).unwrap();
    let sparse = Tensor::new(&[0f64, 1.], &Device::Cpu).unwrap();
    let cases: Vec<(Box<dyn Loss>, &Tensor, &Tensor)> = vec![
        (Box::new(BinaryCrossentropy::new()), &y_true, &hard_probs),
        (
            Box::new(BinaryCrossentropy::new().from_logits(true)),
            &y_true,
            &huge_logits,
        ),
        (
            Box::new(BinaryFocalCrossentropy::new()),
            &y_true,
            &hard_probs,
        ),
        (
            Box::new(BinaryFocalCrossentropy::new().from_logits(true)),
            &y_true,
            &huge_logits,
        ),
        (
            Box::new(CategoricalCrossentropy::new()),
            &y_true,
            &hard_probs,
        ),
        (
            Box::new(CategoricalCrossentropy::new().from_logits(true)),
            &y_true,
            &huge_logits,
        ),
        (
            Box::new(CategoricalFocalCrossentropy::new()),
            &y_true,
            &hard_probs,
        ),
        (
            Box::new(CategoricalFocalCrossentropy::new().from_logits(true)),
            &y_true,
            &huge_logits,
        ),
        (
            Box::new(SparseCategoricalCrossentropy::new()),
            &sparse,
            &hard_probs,
        ),
        (
            Box::new(SparseCategoricalCrossentropy::new().from_logits(true)),
            &sparse,
            &huge_logits,
        ),
    ];
    for (loss, t, p) in &cases {
        let var = Var::from_tensor(p).unwrap();
        let v = loss.reduced(t, var.as_tensor(), None, None).unwrap();
        assert!(
            v.to_scalar::<f64>().unwrap().is_finite(),
            "{}: value not finite",
            loss.name()
        );
        let g = v.backward().unwrap();
        assert!(
            all_finite(g.get(var.as_tensor()).unwrap()),
            "{}: gradient not finite",
            loss.name()
        );
    }
}

/// One SGD step with learning rate 1 on the whole batch moves each weight by minus its gradient
/// of the total loss (compile loss + regularizer + added term); compare with finite differences
/// of `evaluate`'s total.
fn check_step_against_finite_differences(activation: Activation, square_penalty: bool) {
    let x = Input::new([3]);
    let h = Dense::new(4)
        .activation(activation)
        .kernel_regularizer(L2::new(0.05))
        .apply(&x)
        .unwrap();
    let y = Dense::new(2).with_name("out").apply(&h).unwrap();
    let mut model = Model::builder(&[x], std::slice::from_ref(&y))
        .dtype(DType::F64)
        .seed(3)
        .build()
        .unwrap();
    let yy = y;
    model
        .add_loss("penalty", move |t: &Tensors| {
            let y = t.get(&yy)?;
            let per_entry = if square_penalty { y.sqr()? } else { y.abs()? };
            Ok((per_entry.mean_all()? * 0.3)?)
        })
        .unwrap();
    model
        .compile(
            Compile::new(Sgd::new(1.0))
                .loss(Huber::new().delta(0.5))
                .loss_weight(1.5),
        )
        .unwrap();
    let data = Dataset::new(random((8, 3), -1.0, 1.0, 7), random((8, 2), -1.0, 1.0, 8))
        .unwrap()
        .with_sample_weight(random((8, 1), 0.5, 1.5, 9).squeeze(1).unwrap())
        .unwrap();

    let weights = model.weights();
    let before: Vec<Vec<f64>> = weights
        .iter()
        .map(|w| w.var.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    let total = |m: &Model| m.evaluate(&data, 8).unwrap().get("loss").unwrap();
    let eps = 1e-6;
    let mut fd: Vec<Vec<f64>> = Vec::new();
    for (w, values) in weights.iter().zip(&before) {
        let mut g = Vec::new();
        for i in 0..values.len() {
            let set = |d: f64| {
                let mut v = values.clone();
                v[i] += d;
                w.var
                    .set(&Tensor::from_vec(v, w.var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
            };
            set(eps);
            let up = total(&model);
            set(-eps);
            let down = total(&model);
            set(0.0);
            g.push((up - down) / (2.0 * eps));
        }
        fd.push(g);
    }
    model
        .fit(&data, Fit::new().batch_size(8).shuffle(false).quiet())
        .unwrap();
    for ((w, b), g) in weights.iter().zip(&before).zip(&fd) {
        let after: Vec<f64> = w.var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for i in 0..b.len() {
            let step = b[i] - after[i];
            assert!(
                (step - g[i]).abs() <= 1e-6 + 1e-5 * g[i].abs(),
                "{}[{i}]: step {step} vs gradient {}",
                w.name,
                g[i]
            );
        }
    }
}

#[test]
fn the_training_step_follows_the_gradient_of_the_total_loss() {
    check_step_against_finite_differences(Activation::Tanh, false);
}

/// The same check through the fused Dense kernel (ReLU and linear layers with a bias, on the
/// CPU), whose backward pass is written by hand. (A sample whose hidden units are all off has
/// an output of exactly 0, where |y| has a kink, so the added term here is a mean square.)
#[test]
fn the_fused_relu_dense_step_follows_the_gradient_of_the_total_loss() {
    check_step_against_finite_differences(Activation::Relu, true);
}

#[test]
fn the_rest_of_the_catalogue_matches_finite_differences() {
    let signs = random((5, 4), 0.0, 1.0, 10)
        .ge(0.5)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let scores = random((5, 4), -2.0, 2.0, 11);
    let probs = kiln::Activation::Softmax
        .apply(&random((5, 4), -2.0, 2.0, 12))
        .unwrap();
    let target_probs = kiln::Activation::Softmax
        .apply(&random((5, 4), -2.0, 2.0, 13))
        .unwrap();
    let counts = random((5, 4), 0.0, 5.0, 14).round().unwrap();
    let rates = random((5, 4), 0.2, 4.0, 15);
    let sigmoid = kiln::Activation::Sigmoid.apply(&scores).unwrap();
    let labels = Tensor::new(&[0f64, 2., 1., 3., 3.], &Device::Cpu).unwrap();
    let one_hot = one_hot_f64(&[0, 2, 1, 3, 3], 4);
    let cases: Vec<(Box<dyn Loss>, &Tensor, &Tensor)> = vec![
        (Box::new(Hinge::new()), &signs, &scores),
        (Box::new(SquaredHinge::new()), &signs, &scores),
        (Box::new(CategoricalHinge::new()), &one_hot, &scores),
        (Box::new(KLDivergence::new()), &target_probs, &probs),
        (Box::new(Poisson::new()), &counts, &rates),
        (Box::new(CosineSimilarity::new()), &target_probs, &scores),
        (Box::new(Dice::new().axis(vec![-1])), &signs, &sigmoid),
        (
            Box::new(Tversky::new().alpha(0.3).beta(0.7).axis(vec![-1])),
            &signs,
            &sigmoid,
        ),
        (
            Box::new(CategoricalGeneralizedCrossEntropy::new().q(0.4)),
            &labels,
            &probs,
        ),
        (Box::new(Circle::new().gamma(4.0)), &labels, &scores),
    ];
    for (loss, t, p) in &cases {
        check_against_finite_differences(loss.as_ref(), t, p);
    }
    // Dice with Keras' default axis=None is one value for the whole batch.
    let dice = Dice::new();
    assert!(dice.whole_batch());
    let var = Var::from_tensor(&sigmoid).unwrap();
    let v = dice.reduced(&signs, var.as_tensor(), None, None).unwrap();
    assert!(all_finite(
        v.backward().unwrap().get(var.as_tensor()).unwrap()
    ));
}

#[test]
fn ctc_matches_finite_differences() {
    // Two sequences of 6 steps over 4 classes (0 = blank); labels packed left, 0-padded.
    let logits = random((2, 24), -2.0, 2.0, 16).reshape((2, 6, 4)).unwrap();
    let labels = Tensor::new(&[[1f64, 2., 2.], [3., 1., 0.]], &Device::Cpu).unwrap();
    check_against_finite_differences(&Ctc::new(), &labels, &logits);
}
