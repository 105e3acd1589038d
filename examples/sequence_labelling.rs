//! Sequence labelling with masks: Embedding(mask_zero) → LSTM(return_sequences) → per-step Dense,
//! trained with sparse crossentropy on variable-length sequences padded with id 0. The padding
//! mask flows from the embedding to the loss, which averages over real tokens only, so padding
//! changes nothing: the same held-out sequences padded to 12 or to 20 steps give the same loss.
//!
//! The task is synthetic and needs context: each token (ids 1..=20) is tagged 0 when it is small
//! (≤ 10); a large token is tagged 1 when the trigger token 1 appeared earlier in its sequence,
//! and 2 otherwise.
//!
//! Run with `cargo run --release --example sequence_labelling`.

use kiln::prelude::*;
use rand::{Rng, SeedableRng};

pub struct Summary {
    /// Held-out accuracy over real (unpadded) tokens.
    pub token_accuracy: f64,
    /// The same, as the masked `accuracy` metric reports it.
    pub metric_accuracy: f64,
    /// Held-out loss with the sequences padded to 12 steps.
    pub loss_unpadded: f64,
    /// The same, padded to 20 steps.
    pub loss_padded: f64,
}

const STEPS: usize = 12;
const VOCAB: usize = 21; // ids 1..=20, 0 is padding

/// `n` sequences of 3 to 12 tokens, padded to `steps`: ids `[n, steps]` and tags `[n, steps]`.
fn make_data(n: usize, steps: usize, seed: u64) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut ids = Vec::with_capacity(n);
    let mut tags = Vec::with_capacity(n);
    for _ in 0..n {
        let len = rng.random_range(3..=STEPS);
        let (mut row, mut row_tags) = (vec![0u32; steps], vec![0u32; steps]);
        let mut seen_trigger = false;
        for t in 0..len {
            let id = rng.random_range(1..VOCAB as u32);
            row[t] = id;
            row_tags[t] = match (id <= 10, seen_trigger) {
                (true, _) => 0,
                (false, true) => 1,
                (false, false) => 2,
            };
            seen_trigger |= id == 1;
        }
        ids.push(row);
        tags.push(row_tags);
    }
    (ids, tags)
}

fn to_tensor(rows: &[Vec<u32>], steps: usize, device: &Device) -> kiln::Result<Tensor> {
    let flat: Vec<f32> = rows
        .iter()
        .flat_map(|r| r.iter().copied().chain(std::iter::repeat(0)).take(steps))
        .map(|v| v as f32)
        .collect();
    Ok(Tensor::from_vec(flat, (rows.len(), steps), device)?)
}

pub fn run(verbose: bool) -> kiln::Result<Summary> {
    let device = Device::Cpu;
    let (ids, tags) = make_data(800, STEPS, 5);
    let (train_ids, test_ids) = ids.split_at(640);
    let (train_tags, test_tags) = tags.split_at(640);

    // Shared layers, so a second model reading longer padding uses the same weights.
    let embedding = Embedding::new(VOCAB, 16).mask_zero(true).shared();
    let lstm = Lstm::new(24).return_sequences(true).shared();
    let tagger = Dense::new(3).with_name("tags").shared();
    let build = |steps: usize| -> kiln::Result<Model> {
        let input = Input::new([steps]);
        let h = lstm.apply(&embedding.apply(&input)?)?;
        let logits = tagger.apply(&h)?;
        let mut model = Model::builder(&[input], &[logits]).seed(5).build()?;
        model.compile(
            Compile::new(Adam::new(1e-2))
                .loss(SparseCategoricalCrossentropy::new().from_logits(true))
                .metric(Accuracy::sparse().with_name("accuracy")),
        )?;
        Ok(model)
    };
    let mut model = build(STEPS)?;
    let train = Dataset::new(
        to_tensor(train_ids, STEPS, &device)?,
        to_tensor(train_tags, STEPS, &device)?,
    )?;
    model.fit(
        &train,
        Fit::new()
            .epochs(12)
            .batch_size(32)
            .seed(5)
            .verbose(verbose),
    )?;

    // Held-out accuracy over the real tokens only.
    let x_test = to_tensor(test_ids, STEPS, &device)?;
    let predicted = model.predict(std::slice::from_ref(&x_test), 256)?[0]
        .argmax(2)?
        .to_vec2::<u32>()?;
    let (mut right, mut total) = (0usize, 0usize);
    for ((row, tag_row), pred_row) in test_ids.iter().zip(test_tags).zip(&predicted) {
        for t in 0..STEPS {
            if row[t] != 0 {
                total += 1;
                right += usize::from(pred_row[t] == tag_row[t]);
            }
        }
    }

    // The same held-out sequences with eight more steps of padding, read by a twin model.
    let long = build(STEPS + 8)?;
    let test = Dataset::new(x_test, to_tensor(test_tags, STEPS, &device)?)?;
    let test_long = Dataset::new(
        to_tensor(test_ids, STEPS + 8, &device)?,
        to_tensor(test_tags, STEPS + 8, &device)?,
    )?;
    let logs = model.evaluate(&test, 256)?;
    Ok(Summary {
        token_accuracy: right as f64 / total as f64,
        metric_accuracy: logs.get("accuracy").unwrap_or(f64::NAN),
        loss_unpadded: logs.get("loss").unwrap_or(f64::NAN),
        loss_padded: long
            .evaluate(&test_long, 256)?
            .get("loss")
            .unwrap_or(f64::NAN),
    })
}

#[allow(dead_code)]
fn main() -> kiln::Result<()> {
    let s = run(true)?;
    println!(
        "held-out token accuracy {:.4}; loss padded to {STEPS} steps {:.6}, to {} steps {:.6}",
        s.token_accuracy,
        s.loss_unpadded,
        STEPS + 8,
        s.loss_padded
    );
    Ok(())
}
