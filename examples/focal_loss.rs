//! Categorical focal loss (Lin et al. 2017) on the built-in digits, with its gamma and alpha.
//!
//! Run with `cargo run --release --example focal_loss`.

use kiln::prelude::*;

pub struct Summary {
    pub test_accuracy: f64,
    pub test_loss: f64,
}

pub fn run(verbose: bool) -> kiln::Result<Summary> {
    let device = Device::Cpu;
    let digits = kiln::data::digits(&device)?;
    let one_hot = kiln::data::one_hot(&digits.targets()[0], 10)?;
    let data = Dataset::new(digits.inputs()[0].clone(), one_hot)?;
    let (train, test) = data.shuffled_split(0.25, 1)?;

    let x = Input::new([64]);
    let h = Dense::new(48).activation(Activation::Relu).apply(&x)?;
    let probs = Dense::new(10)
        .activation(Activation::Softmax)
        .with_name("digit")
        .apply(&h)?;
    let mut model = Model::builder(&[x], &[probs]).seed(1).build()?;
    model.compile(
        Compile::new(Adam::new(3e-3))
            .loss(CategoricalFocalCrossentropy::new().gamma(2.0).alpha(0.25))
            .metric(Accuracy::categorical()),
    )?;
    model.fit(
        &train,
        Fit::new()
            .epochs(30)
            .batch_size(32)
            .seed(1)
            .verbose(verbose),
    )?;
    let logs = model.evaluate(&test, 128)?;
    Ok(Summary {
        test_accuracy: logs.get("categorical_accuracy").unwrap_or(0.0),
        test_loss: logs.get("loss").unwrap_or(f64::NAN),
    })
}

#[allow(dead_code)]
fn main() -> kiln::Result<()> {
    let s = run(true)?;
    println!(
        "held-out: focal loss {:.4}, accuracy {:.4}",
        s.test_loss, s.test_accuracy
    );
    Ok(())
}
