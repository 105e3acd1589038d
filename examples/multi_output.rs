//! Two outputs from one trunk, each with its own loss, weighted with `loss_weights`: the digit
//! (10 classes) and its parity (odd or even).
//!
//! Run with `cargo run --release --example multi_output`.

use kiln::prelude::*;

pub struct Summary {
    pub test: Logs,
    pub parity_weight: f64,
}

pub fn run(verbose: bool) -> kiln::Result<Summary> {
    let device = Device::Cpu;
    let digits = kiln::data::digits(&device)?;
    let labels = digits.targets()[0].clone();
    let parity = labels
        .affine(0.5, 0.0)?
        .floor()?
        .affine(-2.0, 0.0)?
        .add(&labels)?
        .unsqueeze(1)?;
    let data = Dataset::multi(digits.inputs().to_vec(), vec![labels, parity])?;
    let (train, test) = data.shuffled_split(0.2, 4)?;

    let x = Input::new([64]);
    let h = Dense::new(64)
        .activation(Activation::Relu)
        .kernel_regularizer(L2::new(1e-4))
        .apply(&x)?;
    let digit = Dense::new(10).with_name("digit").apply(&h)?;
    let odd = Dense::new(1).with_name("parity").apply(&h)?;
    let mut model = Model::new(&[x], &[digit, odd])?;

    let parity_weight = 0.5;
    model.compile(
        Compile::new(Adam::new(3e-3))
            .loss_for(
                "digit",
                SparseCategoricalCrossentropy::new().from_logits(true),
            )
            .loss_for("parity", BinaryCrossentropy::new().from_logits(true))
            .loss_weight_for("parity", parity_weight)
            .metric_for("digit", Accuracy::sparse())
            .metric_for("parity", Accuracy::binary_threshold(0.0)),
    )?;
    model.fit(
        &train,
        Fit::new()
            .epochs(20)
            .batch_size(32)
            .validation_split(0.1)
            .verbose(verbose),
    )?;
    Ok(Summary {
        test: model.evaluate(&test, 512)?,
        parity_weight,
    })
}

#[allow(dead_code)]
fn main() -> kiln::Result<()> {
    let s = run(true)?;
    println!("held-out: {}", s.test.summary());
    Ok(())
}
