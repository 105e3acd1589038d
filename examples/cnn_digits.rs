//! A small convolutional network on the built-in 8×8 digits: Reshape → Conv2D → MaxPooling2D →
//! Conv2D → MaxPooling2D → Flatten → Dense, with an L2 penalty on the convolution kernels
//! (reported as its own `l2` term).
//!
//! Run with `cargo run --release --example cnn_digits`.

use kiln::prelude::*;

pub struct Summary {
    pub test_accuracy: f64,
    pub test_loss: f64,
    pub l2: f64,
}

pub fn run(verbose: bool) -> kiln::Result<Summary> {
    let device = Device::Cpu;
    let data = kiln::data::digits(&device)?;
    let (train, test) = data.shuffled_split(0.25, 3)?;

    let pixels = Input::new([64]);
    let image = Reshape::new([8, 8, 1]).apply(&pixels)?;
    let h = Conv2D::new(16, (3, 3))
        .padding(Padding::Same)
        .activation(Activation::Relu)
        .kernel_regularizer(L2::new(1e-4))
        .apply(&image)?;
    let h = MaxPooling2D::new((2, 2)).apply(&h)?;
    let h = Conv2D::new(32, (3, 3))
        .padding(Padding::Same)
        .activation(Activation::Relu)
        .kernel_regularizer(L2::new(1e-4))
        .apply(&h)?;
    let h = MaxPooling2D::new((2, 2)).apply(&h)?;
    let logits = Dense::new(10)
        .with_name("digit")
        .apply(&Flatten::new().apply(&h)?)?;
    let mut model = Model::builder(&[pixels], &[logits]).seed(3).build()?;
    model.compile(
        Compile::new(Adam::new(5e-3))
            .loss(SparseCategoricalCrossentropy::new().from_logits(true))
            .metric(Accuracy::sparse()),
    )?;
    model.fit(
        &train,
        Fit::new()
            .epochs(15)
            .batch_size(32)
            .seed(3)
            .verbose(verbose),
    )?;
    let logs = model.evaluate(&test, 256)?;
    Ok(Summary {
        test_accuracy: logs.get("sparse_categorical_accuracy").unwrap_or(0.0),
        test_loss: logs.get("loss").unwrap_or(f64::NAN),
        l2: logs.get("l2").unwrap_or(f64::NAN),
    })
}

#[allow(dead_code)]
fn main() -> kiln::Result<()> {
    let s = run(true)?;
    println!(
        "held-out: loss {:.4} (of which l2 {:.5}), accuracy {:.4}",
        s.test_loss, s.l2, s.test_accuracy
    );
    Ok(())
}
