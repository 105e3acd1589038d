//! An added loss over an intermediate layer's output: an L1 sparsity penalty on the hidden
//! activations, read from the forward pass through the tensor's handle.
//!
//! Run with `cargo run --release --example intermediate_add_loss`.

use kiln::prelude::*;

pub struct Summary {
    pub test: Logs,
    /// mean |hidden| over the held-out set, computed by a sub-model that shares the weights.
    pub mean_abs_hidden: f64,
    pub factor: f64,
}

pub fn run(verbose: bool) -> kiln::Result<Summary> {
    let device = Device::Cpu;
    let (train, test) = kiln::data::digits(&device)?.shuffled_split(0.2, 5)?;

    let x = Input::new([64]);
    let hidden = Dense::new(64)
        .activation(Activation::Relu)
        .with_name("hidden")
        .apply(&x)?;
    let y = Dense::new(10).with_name("digit").apply(&hidden)?;
    let mut model = Model::new(std::slice::from_ref(&x), &[y])?;

    let factor = 1e-2;
    let h = hidden.clone();
    model.add_loss("sparsity", move |t: &Tensors| {
        Ok((t.get(&h)?.abs()?.mean_all()? * factor)?)
    })?;
    model.compile(
        Compile::new(Adam::new(3e-3))
            .loss(SparseCategoricalCrossentropy::new().from_logits(true))
            .metric(Accuracy::sparse()),
    )?;
    model.fit(
        &train,
        Fit::new().epochs(15).batch_size(32).verbose(verbose),
    )?;
    let logs = model.evaluate(&test, test.len())?;

    // A second model over the same layers reads the hidden activations directly.
    let features = Model::new(&[x], &[hidden])?;
    let h = &features.predict(test.inputs(), 512)?[0];
    let mean_abs = h
        .abs()?
        .mean_all()?
        .to_dtype(kiln::candle::DType::F64)?
        .to_scalar::<f64>()?;
    Ok(Summary {
        test: logs,
        mean_abs_hidden: mean_abs,
        factor,
    })
}

#[allow(dead_code)]
fn main() -> kiln::Result<()> {
    let s = run(true)?;
    println!("held-out: {}", s.test.summary());
    println!("sparsity by hand: {:.6}", s.factor * s.mean_abs_hidden);
    Ok(())
}
