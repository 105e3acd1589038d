//! A training step of your own, as a Keras user writes one with `GradientTape`: the gradients of
//! a batch without an update (`model.gradients`), changed by hand (here: each layer's gradient
//! scaled by its own factor), then applied with the compiled optimizer and its clipping
//! (`model.apply_gradients`, Keras' `optimizer.apply_gradients`). With a factor of 1 it is
//! exactly the step `fit` takes. Then `summary()`, `get_weights`/`set_weights` and a `.keras`
//! round trip.
//!
//! Run with `cargo run --release --example custom_training_step`.

use kiln::prelude::*;

pub struct Summary {
    /// Held-out accuracy after the hand-written loop.
    pub test_accuracy: f64,
    /// The largest weight difference between the hand-written loop (all factors 1) and `fit`.
    pub max_difference_from_fit: f32,
    /// The largest prediction difference after saving to `.keras` and loading back.
    pub max_difference_after_reload: f32,
}

fn build() -> kiln::Result<Model> {
    let x = Input::new([64]);
    let h = Dense::new(32)
        .activation(Activation::Relu)
        .with_name("hidden")
        .apply(&x)?;
    let y = Dense::new(10).with_name("digit").apply(&h)?;
    let mut model = Model::new(&[x], &[y])?;
    model.compile(
        Compile::new(Adam::new(5e-3).global_clipnorm(1.0))
            .loss(SparseCategoricalCrossentropy::new().from_logits(true))
            .metric(Accuracy::sparse()),
    )?;
    Ok(model)
}

/// One epoch of hand-written steps over `data` in order, in batches of `batch`; each weight's
/// gradient is scaled by `factor(name)` before the update.
fn epoch(
    model: &mut Model,
    data: &Dataset,
    batch: usize,
    factor: &dyn Fn(&str) -> f64,
) -> kiln::Result<()> {
    for start in (0..data.len()).step_by(batch) {
        let b = data.slice(start, batch.min(data.len() - start))?;
        let mut g = model.gradients(&b)?; // every trainable weight's gradient, no update
        for (name, grad) in &mut g.weights {
            *grad = (&*grad * factor(name))?;
        }
        model.apply_gradients(&g.weights)?; // clipping to norm 1, then Adam's step
    }
    Ok(())
}

pub fn run(verbose: bool) -> kiln::Result<Summary> {
    let device = Device::Cpu;
    let (train, test) = kiln::data::digits(&device)?.shuffled_split(0.2, 4)?;

    // The hand-written loop with every factor 1 against fit on the same batches.
    let mut by_hand = build()?;
    let mut fitted = build()?;
    if verbose {
        println!("{}", by_hand.summary());
    }
    epoch(&mut by_hand, &train, 64, &|_| 1.0)?;
    fitted.fit(&train, Fit::new().batch_size(64).shuffle(false).quiet())?;
    let mut max_difference_from_fit = 0f32;
    for (a, b) in by_hand.get_weights()?.iter().zip(fitted.get_weights()?) {
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        max_difference_from_fit = max_difference_from_fit.max(d);
    }

    // A step fit cannot take: the first layer learns at a tenth of the rate.
    for _ in 0..14 {
        epoch(
            &mut by_hand,
            &train,
            64,
            &|name| match name.starts_with("hidden/") {
                true => 0.1,
                false => 1.0,
            },
        )?;
    }
    let test_accuracy = by_hand
        .evaluate(&test, 512)?
        .get("sparse_categorical_accuracy")
        .unwrap_or(0.0);

    // get_weights / set_weights in Keras' order, and a .keras file Keras reads.
    let saved = by_hand.get_weights()?;
    let zeros = saved
        .iter()
        .map(|t| t.zeros_like())
        .collect::<kiln::candle::Result<Vec<_>>>()?;
    by_hand.set_weights(&zeros)?;
    by_hand.set_weights(&saved)?;
    let path = std::env::temp_dir().join(format!("kiln-custom-step-{}.keras", std::process::id()));
    by_hand.save_keras(&path)?;
    let loaded = Model::from_keras(&path)?;
    std::fs::remove_file(&path).ok();
    let a = by_hand.predict(test.inputs(), 512)?;
    let b = loaded.predict(test.inputs(), 512)?;
    let max_difference_after_reload = (&a[0] - &b[0])?.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(Summary {
        test_accuracy,
        max_difference_from_fit,
        max_difference_after_reload,
    })
}

#[allow(dead_code)]
fn main() -> kiln::Result<()> {
    kiln::runtime::configure_cpu_threads();
    let s = run(true)?;
    println!(
        "hand-written step against fit: largest weight difference {:e}",
        s.max_difference_from_fit
    );
    println!("held-out accuracy: {:.3}", s.test_accuracy);
    println!(
        "after a .keras round trip: largest prediction difference {:e}",
        s.max_difference_after_reload
    );
    Ok(())
}
