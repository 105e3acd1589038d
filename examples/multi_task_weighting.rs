//! Three heads of very different scales on one trunk, on the built-in digits: the digit (10
//! classes, crossentropy ≈ 2.3 at the start), its parity (binary crossentropy ≈ 0.7) and a
//! noisy regression target (the ink in the digit's top half, in units where its mean squared
//! error starts near 100). Trained with fixed weights (all 1) and with each loss weighting
//! strategy, over several seeds; prints each head's held-out metric and the time per epoch.
//!
//! Run with `cargo run --release --example multi_task_weighting [SEEDS] [EPOCHS] [NAMES…]`
//! (default 5 seeds, 30 epochs, every strategy; NAMES: only the rows whose name starts so).

use kiln::loss_weighting::{DynamicWeightAverage, Famo, GradNorm, PCGrad, Strategy, Uncertainty};
use kiln::prelude::*;
use rand::{Rng, SeedableRng};

/// Held-out results of one run.
pub struct Outcome {
    pub digit_accuracy: f64,
    pub parity_accuracy: f64,
    pub value_rmse: f64,
    pub epoch_time_s: f64,
}

/// The three targets: digit, parity (column), noisy top-half ink (column, noise σ = 3).
pub fn data(device: &Device) -> kiln::Result<Dataset> {
    let digits = kiln::data::digits(device)?;
    let labels = digits.targets()[0].clone();
    let parity = labels
        .affine(0.5, 0.0)?
        .floor()?
        .affine(-2.0, 0.0)?
        .add(&labels)?
        .unsqueeze(1)?;
    let x = &digits.inputs()[0];
    let ink = x.narrow(1, 0, 32)?.sum(1)?; // 0..32, mean about 10
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let noise: Vec<f32> = (0..ink.dims()[0])
        .map(|_| {
            // Box–Muller: a normal draw from two uniform ones.
            let (u, v): (f32, f32) = (rng.random_range(1e-7..1.0), rng.random_range(0.0..1.0));
            3.0 * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        })
        .collect();
    let noise = Tensor::from_vec(noise, ink.dims(), device)?;
    let value = (ink + noise)?.unsqueeze(1)?;
    Dataset::multi(digits.inputs().to_vec(), vec![labels, parity, value])
}

/// Trains one model with `strategy` (None: fixed weights 1) and evaluates it on held-out data.
pub fn run(strategy: Option<Box<dyn Strategy>>, seed: u64, epochs: usize) -> kiln::Result<Outcome> {
    let (train, test) = data(&Device::Cpu)?.shuffled_split(0.2, seed)?;
    let x = Input::new([64]);
    let h = Dense::new(64)
        .activation(Activation::Relu)
        .with_name("shared")
        .apply(&x)?;
    let digit = Dense::new(10).with_name("digit").apply(&h)?;
    let parity = Dense::new(1).with_name("parity").apply(&h)?;
    let value = Dense::new(1).with_name("value").apply(&h)?;
    let mut model = Model::builder(&[x], &[digit, parity, value])
        .seed(seed)
        .build()?;
    let mut compile = Compile::new(Adam::new(1e-3))
        .loss_for(
            "digit",
            SparseCategoricalCrossentropy::new().from_logits(true),
        )
        .loss_for("parity", BinaryCrossentropy::new().from_logits(true))
        .loss_for("value", "mse")
        .metric_for("digit", Accuracy::sparse())
        .metric_for("parity", Accuracy::binary_threshold(0.0))
        .metric_for("value", RootMeanSquaredError::new());
    if let Some(s) = strategy {
        compile = compile.loss_weighting_boxed(s);
    }
    model.compile(compile)?;
    let history = model.fit(
        &train,
        Fit::new().epochs(epochs).batch_size(32).seed(seed).quiet(),
    )?;
    let times = history.get("epoch_time_s").unwrap_or_default();
    let logs = model.evaluate(&test, 512)?;
    let get = |k: &str| logs.get(k).unwrap_or(f64::NAN);
    Ok(Outcome {
        digit_accuracy: get("digit_sparse_categorical_accuracy"),
        parity_accuracy: get("parity_binary_accuracy"),
        value_rmse: get("value_root_mean_squared_error"),
        epoch_time_s: times.iter().sum::<f64>() / times.len().max(1) as f64,
    })
}

/// The strategies compared, by the name the table prints.
pub fn strategies() -> Vec<(&'static str, Option<Box<dyn Strategy>>)> {
    vec![
        ("fixed (1, 1, 1)", None),
        ("uncertainty", Some(Box::new(Uncertainty::new()))),
        ("dwa (T = 2)", Some(Box::new(DynamicWeightAverage::new()))),
        ("famo", Some(Box::new(Famo::new()))),
        ("pcgrad", Some(Box::new(PCGrad::new()))),
        ("gradnorm (α = 1.5)", Some(Box::new(GradNorm::new()))),
    ]
}

fn mean_sd(v: &[f64]) -> String {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let sd = (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt();
    format!("{m:.4} ± {sd:.4}")
}

fn main() -> kiln::Result<()> {
    kiln::runtime::configure_cpu_threads();
    let mut args = std::env::args().skip(1);
    let seeds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let epochs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(30);
    // Optionally only the strategies whose table name starts with one of these.
    let only: Vec<String> = args.collect();
    println!("| weighting | digit accuracy | parity accuracy | value RMSE | s/epoch |");
    println!("|---|---|---|---|---|");
    for (name, strategy) in strategies() {
        if !only.is_empty() && !only.iter().any(|o| name.starts_with(o.as_str())) {
            continue;
        }
        let mut rows: Vec<Outcome> = Vec::new();
        for seed in 0..seeds {
            rows.push(run(strategy.clone(), seed, epochs)?);
        }
        let col = |f: fn(&Outcome) -> f64| mean_sd(&rows.iter().map(f).collect::<Vec<_>>());
        println!(
            "| {name} | {} | {} | {} | {} |",
            col(|o| o.digit_accuracy),
            col(|o| o.parity_accuracy),
            col(|o| o.value_rmse),
            col(|o| o.epoch_time_s),
        );
    }
    Ok(())
}
