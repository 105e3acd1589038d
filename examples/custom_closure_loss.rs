//! A custom loss written as a closure: an asymmetric squared error that penalizes
//! under-prediction more than over-prediction. Both hyperparameters are captured by the closure.
//!
//! Run with `cargo run --release --example custom_closure_loss`.

use kiln::prelude::*;
use rand::{Rng, SeedableRng};

/// What the example reports.
pub struct Summary {
    pub first_loss: f64,
    pub last_loss: f64,
    pub learned_weights: Vec<f32>,
}

/// y = 2·x0 - 3·x1 + 0.5 + noise, 512 samples.
fn regression_data(device: &Device) -> kiln::Result<Dataset> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let n = 512;
    let mut xs = Vec::with_capacity(n * 2);
    let mut ys = Vec::with_capacity(n);
    for _ in 0..n {
        let (a, b): (f32, f32) = (rng.random_range(-1.0..1.0), rng.random_range(-1.0..1.0));
        xs.extend([a, b]);
        ys.push(2.0 * a - 3.0 * b + 0.5 + rng.random_range(-0.05..0.05));
    }
    Dataset::new(
        Tensor::from_vec(xs, (n, 2), device)?,
        Tensor::from_vec(ys, (n, 1), device)?,
    )
}

pub fn run(verbose: bool) -> kiln::Result<Summary> {
    let device = Device::Cpu;
    let data = regression_data(&device)?;

    // Two hyperparameters, captured by the closure.
    let (under_weight, over_weight) = (4.0, 1.0);
    let asymmetric_mse = loss_fn("asymmetric_mse", move |y_true: &Tensor, y_pred: &Tensor| {
        let err = (y_pred - y_true)?;
        let under = err.lt(0.0)?.to_dtype(err.dtype())?;
        let weight = ((&under * under_weight)? + (under.affine(-1.0, 1.0)? * over_weight)?)?;
        // One value per sample: mean over the feature axis only.
        Ok(weight.mul(&err.sqr()?)?.mean(D::Minus1)?)
    });

    let x = Input::new([2]);
    let y = Dense::new(1).with_name("y").apply(&x)?;
    let mut model = Model::new(&[x], &[y])?;
    model.compile(
        Compile::new(Adam::new(0.05))
            .loss(asymmetric_mse)
            .metric("mae"),
    )?;
    let history = model.fit(&data, Fit::new().epochs(30).batch_size(32).verbose(verbose))?;
    let losses = history.get("loss").unwrap_or_default();
    Ok(Summary {
        first_loss: losses[0],
        last_loss: *losses.last().unwrap_or(&f64::NAN),
        learned_weights: model
            .weight("y/kernel")?
            .var
            .as_tensor()
            .flatten_all()?
            .to_vec1()?,
    })
}

#[allow(dead_code)]
fn main() -> kiln::Result<()> {
    let s = run(true)?;
    println!(
        "asymmetric_mse: first epoch {:.4}, last epoch {:.4}",
        s.first_loss, s.last_loss
    );
    println!(
        "learned kernel {:?} (true coefficients [2, -3])",
        s.learned_weights
    );
    Ok(())
}
