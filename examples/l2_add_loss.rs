//! L2 weight regularization written by hand with `add_loss`: a closure over the model's own
//! kernels, reported as its own term (`l2`) next to the data loss.
//!
//! Run with `cargo run --release --example l2_add_loss`.

use kiln::prelude::*;

pub struct Summary {
    pub logs: Logs,
    pub kernels_sum_of_squares: f64,
    pub factor: f64,
}

pub fn run(verbose: bool) -> kiln::Result<Summary> {
    let device = Device::Cpu;
    let (train, test) = kiln::data::digits(&device)?.shuffled_split(0.2, 2)?;

    let x = Input::new([64]);
    let h = Dense::new(32)
        .activation(Activation::Relu)
        .with_name("hidden")
        .apply(&x)?;
    let y = Dense::new(10).with_name("digit").apply(&h)?;
    let mut model = Model::new(&[x], &[y])?;

    let factor = 1e-3;
    model.add_loss("l2", move |t: &Tensors| {
        let hidden = t.weight("hidden/kernel")?.sqr()?.sum_all()?;
        let digit = t.weight("digit/kernel")?.sqr()?.sum_all()?;
        Ok(((hidden + digit)? * factor)?)
    })?;
    model.compile(
        Compile::new(Adam::new(5e-3))
            .loss(SparseCategoricalCrossentropy::new().from_logits(true))
            .metric(Accuracy::sparse()),
    )?;
    model.fit(
        &train,
        Fit::new().epochs(15).batch_size(32).verbose(verbose),
    )?;
    let logs = model.evaluate(&test, 512)?;
    let mut sum_sq = 0.0;
    for name in ["hidden/kernel", "digit/kernel"] {
        let w = model
            .weight(name)?
            .var
            .as_tensor()
            .to_dtype(kiln::candle::DType::F64)?;
        sum_sq += w.sqr()?.sum_all()?.to_scalar::<f64>()?;
    }
    Ok(Summary {
        logs,
        kernels_sum_of_squares: sum_sq,
        factor,
    })
}

#[allow(dead_code)]
fn main() -> kiln::Result<()> {
    let s = run(true)?;
    println!("held-out: {}", s.logs.summary());
    println!("l2 by hand: {:.6}", s.factor * s.kernels_sum_of_squares);
    Ok(())
}
