//! The built-in default run: the UCI digits, a small MLP, categorical focal loss and an L2
//! kernel penalty, evaluated on a held-out fifth of the data.

use candle_core::Device;
use kiln::prelude::*;

/// What the default run reports.
pub struct DefaultRun {
    pub history: History,
    pub test: Logs,
    pub train_samples: usize,
    pub test_samples: usize,
}

impl DefaultRun {
    pub fn print(&self) {
        println!(
            "kiln default run: UCI digits (8x8), {} train / {} held-out samples",
            self.train_samples, self.test_samples
        );
        println!("model: 64 -> Dense 64 relu (L2 1e-4 on the kernel) -> Dense 10 logits");
        println!("loss: categorical focal crossentropy (gamma 2, from logits) + l2 added term");
        if let Some(last) = self.history.last() {
            println!("final epoch ({}):", self.history.epochs.len());
            for (k, v) in last.iter() {
                println!("  {k:<20} {v:.6}");
            }
        }
        println!("held-out:");
        for (k, v) in self.test.iter() {
            println!("  {k:<20} {v:.6}");
        }
    }
}

/// Trains the default model and evaluates it on held-out data.
pub fn train(epochs: usize, seed: u64, verbose: bool) -> kiln::Result<DefaultRun> {
    let device = Device::Cpu;
    let digits = kiln::data::digits(&device)?;
    let labels = kiln::data::one_hot(&digits.targets()[0], kiln::data::DIGITS_CLASSES)?;
    let data = Dataset::new(digits.inputs()[0].clone(), labels)?;
    let (train, test) = data.shuffled_split(0.2, seed)?;

    let x = Input::named("pixels", [64]);
    let h = Dense::new(64)
        .activation(Activation::Relu)
        .kernel_regularizer(L2::new(1e-4))
        .apply(&x)?;
    let digit = Dense::new(10).name("digit").apply(&h)?;
    let mut model = Model::builder(&[x], &[digit]).seed(seed).build()?;
    model.compile(
        Compile::new(Adam::new(3e-3))
            .loss(
                CategoricalFocalCrossentropy::new()
                    .gamma(2.0)
                    .from_logits(true),
            )
            .metric(Accuracy::categorical().with_name("accuracy")),
    )?;
    let history = model.fit(
        &train,
        Fit::new()
            .epochs(epochs)
            .batch_size(32)
            .validation_split(0.1)
            .seed(seed)
            .verbose(verbose),
    )?;
    let test_logs = model.evaluate(&test, 256)?;
    Ok(DefaultRun {
        history,
        test: test_logs,
        train_samples: train.len(),
        test_samples: test.len(),
    })
}
