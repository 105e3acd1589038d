//! Data-parallel training on ranks of one process (`LocalGroup`, no MPI needed): N ranks end
//! with the weights one process gets, up to float summation order, and a failing rank ends the
//! run on every rank.

use candle_core::{Device, Tensor};
use kiln::distributed::{LocalGroup, SharedCommunicator};
use kiln::prelude::*;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Every weight, flattened, and the history, after one `fit`.
type Trained = (Vec<Vec<f32>>, kiln::History);

/// Runs `train` on each of `n` ranks, one thread each, and returns the ranks' results.
fn on_ranks<T: Send>(
    n: usize,
    train: impl Fn(SharedCommunicator) -> kiln::Result<T> + Sync,
) -> Vec<kiln::Result<T>> {
    std::thread::scope(|s| {
        let train = &train;
        let handles: Vec<_> = LocalGroup::new(n)
            .into_iter()
            .map(|rank| s.spawn(move || train(Arc::new(rank))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn weights(model: &Model) -> Vec<Vec<f32>> {
    model
        .weights()
        .iter()
        .map(|w| w.var.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

/// The largest |a - b| over all weights.
fn max_difference(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// 240 digits; an MLP with an L2 kernel penalty and an activity penalty (added terms), focal
/// loss, class weights (sample weights), accuracy; 5 global batches of 50, 50, 50, 50 and 40 a
/// epoch (uneven shards at N = 3), 10 epochs: 50 steps.
fn digits_run(
    optimizer: &str,
    epochs: usize,
    comm: Option<SharedCommunicator>,
) -> kiln::Result<Trained> {
    let data = kiln::data::digits(&Device::Cpu)?.slice(0, 240)?;
    let x = Input::new([64]);
    let h = Dense::new(32)
        .activation(Activation::Relu)
        .kernel_regularizer(L2::new(1e-3))
        .activity_regularizer(L1::new(1e-4))
        .apply(&x)?;
    let y = Dense::new(10).apply(&h)?;
    let mut model = Model::builder(&[x], &[y]).seed(3).build()?;
    let compile = match optimizer {
        "sgd" => Compile::new(Sgd::new(0.05).momentum(0.9)),
        _ => Compile::new(Adam::new(1e-2)),
    };
    model.compile(
        compile
            .loss(SparseCategoricalCrossentropy::new().from_logits(true))
            .metric(Accuracy::sparse()),
    )?;
    let class_weight = (0..10).map(|c| (c, 0.5 + c as f64 / 10.0)).collect();
    let mut fit = Fit::new()
        .epochs(epochs)
        .batch_size(50)
        .seed(11)
        .class_weight(class_weight)
        .quiet();
    if let Some(c) = comm {
        fit = fit.distributed(c);
    }
    let history = model.fit(&data, fit)?;
    Ok((weights(&model), history))
}

/// The bound on |w_N - w_1| after 50 steps. Every rank's gradient is the exact gradient of its
/// shard's part of the global loss; the sum over ranks differs from one process's sum over the
/// batch only in the order of the f32 additions (relative error ~ 50 · 2⁻²⁴ ≈ 3e-6 per step),
/// and 50 steps of lr 0.05 (momentum 0.9: an effective 0.5) on weights of size ~0.1–1 move a
/// weight by at most ~50 · 0.5 · 3e-6 · |g| ≈ 1e-5 for |g| ≤ 1. The bound leaves a factor 10
/// for the growth of differences through the network: 1e-4. Adam divides by √v, which turns
/// a rounding difference in a near-zero gradient into a full step of lr = 1e-2 at worst, so
/// its bound is a few such steps: 3e-3 (measured below it by far; see the test's output).
const SGD_BOUND: f32 = 1e-4;
const ADAM_BOUND: f32 = 3e-3;

#[test]
fn n_ranks_train_the_weights_of_one_process() {
    for (optimizer, bound) in [("sgd", SGD_BOUND), ("adam", ADAM_BOUND)] {
        let (alone, alone_history) = digits_run(optimizer, 10, None).unwrap();
        // Training moved the weights far beyond the bound.
        let (start, _) = digits_run(optimizer, 0, None).unwrap();
        assert!(max_difference(&start, &alone) > 100.0 * bound);
        // N = 1: the single-process code itself, bit for bit.
        let one = on_ranks(1, |c| digits_run(optimizer, 10, Some(c)));
        let (w1, h1) = one.into_iter().next().unwrap().unwrap();
        assert_eq!(
            w1, alone,
            "{optimizer}: one rank differs from no communicator"
        );
        let untimed = |h: &kiln::History| -> Vec<Vec<(String, f64)>> {
            let keep = |(k, v): (&str, f64)| (k != "epoch_time_s").then(|| (k.to_string(), v));
            h.epochs
                .iter()
                .map(|l| l.iter().filter_map(keep).collect())
                .collect()
        };
        assert_eq!(untimed(&h1), untimed(&alone_history));
        for n in [2, 3] {
            let ranks: Vec<Trained> = on_ranks(n, |c| digits_run(optimizer, 10, Some(c)))
                .into_iter()
                .collect::<kiln::Result<_>>()
                .unwrap();
            // Every rank holds the very same weights and logs.
            for (r, (w, h)) in ranks.iter().enumerate() {
                assert_eq!(
                    w, &ranks[0].0,
                    "{optimizer}: rank {r} of {n} differs from rank 0"
                );
                assert_eq!(h.epochs.len(), 10);
                let (a, b) = (h.last().unwrap(), ranks[0].1.last().unwrap());
                assert_eq!(a.get("loss"), b.get("loss"));
            }
            let diff = max_difference(&ranks[0].0, &alone);
            eprintln!(
                "{optimizer}: N = {n}: largest weight difference {diff:.3e} (bound {bound:.0e})"
            );
            assert!(diff <= bound, "{optimizer}: N = {n}: {diff} > {bound}");
            // The logged values are the global batch's: the same as one process's, to float
            // rounding, and the accuracy counts are exact sums.
            for (got, want) in ranks[0].1.epochs.iter().zip(&alone_history.epochs) {
                for key in ["loss", "l2", "l1", "accuracy"] {
                    let (g, w) = (got.get(key), want.get(key));
                    let (Some(g), Some(w)) = (g, w) else {
                        assert_eq!(g.is_some(), w.is_some(), "{key} logged on one side only");
                        continue;
                    };
                    assert!(
                        (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                        "{key}: {g} vs {w}"
                    );
                }
            }
        }
    }
}

/// The digits MLP of `digits_run` with random layers: `"dropout"`, a Dropout(0.3) after the
/// hidden layer; `"lstm"`, each digit's 8 rows as 8 steps into an LSTM with input dropout 0.25,
/// then a Dropout(0.2); `"pgd"`, the MLP with a PGD term of two steps from a random start.
/// SGD with momentum, 10 epochs of 5 global batches (uneven shards at
/// N = 3): 50 steps.
fn random_layers_run(kind: &str, comm: Option<SharedCommunicator>) -> kiln::Result<Trained> {
    let data = kiln::data::digits(&Device::Cpu)?.slice(0, 240)?;
    let x = Input::new([64]);
    let y = match kind {
        "dropout" => {
            let h = Dense::new(32).activation(Activation::Relu).apply(&x)?;
            let h = Dropout::new(0.3).apply(&h)?;
            Dense::new(10).apply(&h)?
        }
        "pgd" => {
            let h = Dense::new(32).activation(Activation::Relu).apply(&x)?;
            Dense::new(10).apply(&h)?
        }
        _ => {
            let steps = Reshape::new([8, 8]).apply(&x)?;
            let h = Lstm::new(16).dropout(0.25).apply(&steps)?;
            let h = Dropout::new(0.2).apply(&h)?;
            Dense::new(10).apply(&h)?
        }
    };
    let mut model = Model::builder(&[x], &[y]).seed(3).build()?;
    if kind == "pgd" {
        let attack = Adversarial::pgd(0.5, 2, 0.3).random_start(true);
        model.add_loss_term("pgd", attack.multiplier(0.5))?;
    }
    model.compile(
        Compile::new(Sgd::new(0.05).momentum(0.9))
            .loss(SparseCategoricalCrossentropy::new().from_logits(true)),
    )?;
    let mut fit = Fit::new().epochs(10).batch_size(50).seed(11).quiet();
    if let Some(c) = comm {
        fit = fit.distributed(c);
    }
    let history = model.fit(&data, fit)?;
    Ok((weights(&model), history))
}

/// With Dropout (and an LSTM's input dropout, and PGD's random start) N = 2 and 3 ranks end
/// within the bound of the models without random layers (`SGD_BOUND`) of one process: every
/// mask is drawn from the sample's stream in the global batch, whichever rank holds it. N = 1
/// is bit-identical. (Before the per-sample streams, each rank drew from its own generator:
/// 1.97e-1 and 1.94e-1 for "dropout" at N = 2 and 3, 9.19e-2 and 9.88e-2 for "lstm".)
#[test]
fn n_ranks_with_dropout_train_the_weights_of_one_process() {
    for kind in ["dropout", "lstm", "pgd"] {
        let (alone, _) = random_layers_run(kind, None).unwrap();
        let one = on_ranks(1, |c| random_layers_run(kind, Some(c)));
        assert_eq!(one.into_iter().next().unwrap().unwrap().0, alone, "{kind}");
        for n in [2, 3] {
            let ranks: Vec<Trained> = on_ranks(n, |c| random_layers_run(kind, Some(c)))
                .into_iter()
                .collect::<kiln::Result<_>>()
                .unwrap();
            for (r, (w, _)) in ranks.iter().enumerate() {
                assert_eq!(
                    w, &ranks[0].0,
                    "{kind}: rank {r} of {n} differs from rank 0"
                );
            }
            let diff = max_difference(&ranks[0].0, &alone);
            eprintln!(
                "{kind}: N = {n}: largest weight difference {diff:.3e} (bound {SGD_BOUND:.0e})"
            );
            assert!(diff <= SGD_BOUND, "{kind}: N = {n}: {diff} > {SGD_BOUND}");
        }
    }
}

/// Sequences padded with 0 (Embedding mask_zero): the masked mean divides by the valid tokens
/// of the whole global batch, which differ from shard to shard; with sample weights and
/// `mean_with_sample_weight` on a second model.
#[test]
fn masks_and_sample_weights_reduce_over_the_global_batch() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let (n, steps) = (96, 8);
    let mut ids = vec![0f32; n * steps];
    let mut tags = vec![0f32; n * steps];
    for row in 0..n {
        // Lengths from 1 to 8: shards hold very different numbers of valid tokens.
        let len = rng.random_range(1..=steps);
        for t in 0..len {
            let id = rng.random_range(1..12u32);
            ids[row * steps + t] = id as f32;
            tags[row * steps + t] = f32::from(id > 6);
        }
    }
    let sample_weight: Vec<f32> = (0..n).map(|i| 0.25 + (i % 7) as f32 / 4.0).collect();
    let dev = Device::Cpu;
    let data = Dataset::new(
        Tensor::from_vec(ids, (n, steps), &dev).unwrap(),
        Tensor::from_vec(tags, (n, steps), &dev).unwrap(),
    )
    .unwrap()
    .with_sample_weight(Tensor::from_vec(sample_weight, n, &dev).unwrap())
    .unwrap();
    let run = |reduction: Reduction, comm: Option<SharedCommunicator>| -> kiln::Result<Trained> {
        let x = Input::new([steps]);
        let e = Embedding::new(12, 8).mask_zero(true).apply(&x)?;
        let y = Dense::new(2).apply(&e)?;
        let mut model = Model::builder(&[x], &[y]).seed(2).build()?;
        model.compile(
            Compile::new(Sgd::new(0.2))
                .loss(
                    SparseCategoricalCrossentropy::new()
                        .from_logits(true)
                        .with_reduction(reduction),
                )
                .weighted_metric(Accuracy::sparse()),
        )?;
        let mut fit = Fit::new().epochs(10).batch_size(32).seed(1).quiet();
        if let Some(c) = comm {
            fit = fit.distributed(c);
        }
        let history = model.fit(&data, fit)?;
        Ok((weights(&model), history))
    };
    for reduction in [Reduction::SumOverBatchSize, Reduction::MeanWithSampleWeight] {
        let (alone, history) = run(reduction, None).unwrap();
        for n in [2, 3] {
            let ranks: Vec<Trained> = on_ranks(n, |c| run(reduction, Some(c)))
                .into_iter()
                .collect::<kiln::Result<_>>()
                .unwrap();
            let diff = max_difference(&ranks[0].0, &alone);
            eprintln!("masked {reduction}: N = {n}: largest weight difference {diff:.3e}");
            assert!(diff <= SGD_BOUND, "masked {reduction}, N = {n}: {diff}");
            // A shard-local divisor would be far off: check the loss logs too.
            let (got, want) = (ranks[1].1.last().unwrap(), history.last().unwrap());
            let (g, w) = (got.get("loss").unwrap(), want.get("loss").unwrap());
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "loss {g} vs {w}");
            let key = "weighted_accuracy";
            assert_eq!(got.get(key).is_some(), want.get(key).is_some());
        }
    }
}

/// A loss that fails on one rank mid-run ends the run on every rank with a message naming
/// the rank and the cause; nobody waits forever.
#[test]
fn a_failing_rank_ends_the_run_on_every_rank() {
    let calls = Arc::new(AtomicUsize::new(0));
    let started = std::time::Instant::now();
    let results = on_ranks(3, |c| {
        let rank = c.rank();
        let calls = calls.clone();
        let x = Input::new([64]);
        let y = Dense::new(10).apply(&x)?;
        let mut model = Model::new(&[x], &[y])?;
        let base = SparseCategoricalCrossentropy::new().from_logits(true);
        let loss = kiln::losses::loss_fn("flaky", move |t: &Tensor, p: &Tensor| {
            if rank == 1 && calls.fetch_add(1, Ordering::SeqCst) == 7 {
                return Err(kiln::Error::Data(
                    "rows 3..5 of shard.csv are corrupt".into(),
                ));
            }
            kiln::losses::Loss::per_sample(&base, t, p)
        });
        model.compile(Compile::new(Sgd::new(0.1)).loss(loss))?;
        let data = kiln::data::digits(&Device::Cpu)?.slice(0, 120)?;
        model.fit(
            &data,
            Fit::new().epochs(5).batch_size(30).quiet().distributed(c),
        )
    });
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    let messages: Vec<String> = results
        .iter()
        .map(|r| match r {
            Err(e) => e.to_string(),
            Ok(_) => panic!("every rank fails"),
        })
        .collect();
    assert!(
        messages[1].contains("shard.csv are corrupt"),
        "{}",
        messages[1]
    );
    for r in [0, 2] {
        assert!(
            messages[r].contains("rank 1 of 3 failed") && messages[r].contains("shard.csv"),
            "rank {r}: {}",
            messages[r]
        );
    }
}

/// Ranks that start from different data are refused before the first step, naming the rank.
#[test]
fn ranks_with_other_data_are_refused() {
    let results = on_ranks(2, |c| {
        let rows = if c.rank() == 1 { 1..101 } else { 0..100 };
        let data = kiln::data::digits(&Device::Cpu)?.slice(rows.start, 100)?;
        let x = Input::new([64]);
        let y = Dense::new(10).apply(&x)?;
        let mut model = Model::new(&[x], &[y])?;
        model.compile(
            Compile::new(Sgd::new(0.1))
                .loss(SparseCategoricalCrossentropy::new().from_logits(true)),
        )?;
        model.fit(&data, Fit::new().batch_size(20).quiet().distributed(c))
    });
    for r in results {
        let Err(e) = r else { panic!("refused") };
        let e = e.to_string();
        assert!(e.contains("rank 1 of 2 starts from other data"), "{e}");
    }
}

/// A global batch smaller than the number of ranks is refused, saying what to choose.
#[test]
fn batches_smaller_than_the_ranks_are_refused() {
    let results = on_ranks(3, |c| {
        let data = kiln::data::digits(&Device::Cpu)?.slice(0, 22)?;
        let x = Input::new([64]);
        let y = Dense::new(10).apply(&x)?;
        let mut model = Model::new(&[x], &[y])?;
        model.compile(
            Compile::new(Sgd::new(0.1))
                .loss(SparseCategoricalCrossentropy::new().from_logits(true)),
        )?;
        model.fit(&data, Fit::new().batch_size(10).quiet().distributed(c))
    });
    for r in results {
        let Err(e) = r else { panic!("refused") };
        let e = e.to_string();
        assert!(e.contains("a global batch of 2 samples"), "{e}");
    }
}

/// An MLP with a BatchNormalization between its layers, trained on 240 digits for 50 steps
/// of 50 (40 in each epoch's last); `synchronized` or per-rank statistics.
fn batch_norm_run(synchronized: bool, comm: Option<SharedCommunicator>) -> kiln::Result<Trained> {
    let data = kiln::data::digits(&Device::Cpu)?.slice(0, 240)?;
    let x = Input::new([64]);
    let h = Dense::new(32).apply(&x)?;
    let h = BatchNormalization::new()
        .momentum(0.9)
        .synchronized(synchronized)
        .with_name("bn")
        .apply(&h)?;
    let h = kiln::layers::ActivationLayer::new(Activation::Relu).apply(&h)?;
    let y = Dense::new(10).apply(&h)?;
    let mut model = Model::builder(&[x], &[y]).seed(3).build()?;
    model.compile(
        Compile::new(Sgd::new(0.05).momentum(0.9))
            .loss(SparseCategoricalCrossentropy::new().from_logits(true)),
    )?;
    let mut fit = Fit::new().epochs(10).batch_size(50).seed(11).quiet();
    if let Some(c) = comm {
        fit = fit.distributed(c);
    }
    let history = model.fit(&data, fit)?;
    Ok((weights(&model), history))
}

/// Synchronised BatchNormalization: N = 2 and 3 ranks end within [`SGD_BOUND`] of one process
/// on the same global batches (weights and moving statistics: the statistics are summed in
/// f64, so only the gradients' f32 summation order differs, as in the test above); per-rank
/// statistics (the default) normalize each shard by its own mean and variance, which is
/// another function of the data, and end far from it. One process and one rank are the same
/// with or without the option.
#[test]
fn synchronized_batch_norm_trains_the_weights_of_one_process() {
    let (alone, history) = batch_norm_run(true, None).unwrap();
    let (plain, _) = batch_norm_run(false, None).unwrap();
    assert_eq!(alone, plain, "synchronized changes one process");
    let one = on_ranks(1, |c| batch_norm_run(true, Some(c)));
    assert_eq!(one.into_iter().next().unwrap().unwrap().0, alone);
    for n in [2, 3] {
        for synchronized in [true, false] {
            let ranks: Vec<Trained> = on_ranks(n, |c| batch_norm_run(synchronized, Some(c)))
                .into_iter()
                .collect::<kiln::Result<_>>()
                .unwrap();
            for (r, (w, _)) in ranks.iter().enumerate() {
                assert_eq!(w, &ranks[0].0, "rank {r} of {n} differs from rank 0");
            }
            let diff = max_difference(&ranks[0].0, &alone);
            eprintln!(
                "batch norm, synchronized {synchronized}: N = {n}: largest weight difference \
                 {diff:.3e}"
            );
            if synchronized {
                assert!(diff <= SGD_BOUND, "synchronized, N = {n}: {diff}");
                let (got, want) = (ranks[0].1.last().unwrap(), history.last().unwrap());
                let (g, w) = (got.get("loss").unwrap(), want.get("loss").unwrap());
                assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "loss {g} vs {w}");
            } else {
                assert!(diff > 100.0 * SGD_BOUND, "per-rank, N = {n}: only {diff}");
            }
        }
    }
}

/// Synchronised statistics under a mask (Embedding mask_zero, sequences of 1 to 8 valid
/// steps): the count of valid positions is summed over the ranks with the sums, so the
/// shards' very different counts weigh as in one process.
#[test]
fn synchronized_batch_norm_counts_the_masked_positions_of_every_rank() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let (n, steps) = (96, 8);
    let mut ids = vec![0f32; n * steps];
    let mut tags = vec![0f32; n * steps];
    for row in 0..n {
        let len = rng.random_range(1..=steps);
        for t in 0..len {
            let id = rng.random_range(1..12u32);
            ids[row * steps + t] = id as f32;
            tags[row * steps + t] = f32::from(id > 6);
        }
    }
    let dev = Device::Cpu;
    let data = Dataset::new(
        Tensor::from_vec(ids, (n, steps), &dev).unwrap(),
        Tensor::from_vec(tags, (n, steps), &dev).unwrap(),
    )
    .unwrap();
    let run = |synchronized: bool, comm: Option<SharedCommunicator>| -> kiln::Result<Trained> {
        let x = Input::new([steps]);
        let e = Embedding::new(12, 8).mask_zero(true).apply(&x)?;
        let h = BatchNormalization::new()
            .momentum(0.5)
            .synchronized(synchronized)
            .apply(&e)?;
        let y = Dense::new(2).apply(&h)?;
        let mut model = Model::builder(&[x], &[y]).seed(2).build()?;
        model.compile(
            Compile::new(Sgd::new(0.2))
                .loss(SparseCategoricalCrossentropy::new().from_logits(true)),
        )?;
        let mut fit = Fit::new().epochs(10).batch_size(32).seed(1).quiet();
        if let Some(c) = comm {
            fit = fit.distributed(c);
        }
        let history = model.fit(&data, fit)?;
        Ok((weights(&model), history))
    };
    let (alone, _) = run(true, None).unwrap();
    for n in [2, 3] {
        for synchronized in [true, false] {
            let ranks: Vec<Trained> = on_ranks(n, |c| run(synchronized, Some(c)))
                .into_iter()
                .collect::<kiln::Result<_>>()
                .unwrap();
            let diff = max_difference(&ranks[0].0, &alone);
            eprintln!("masked batch norm, synchronized {synchronized}: N = {n}: {diff:.3e}");
            match synchronized {
                true => assert!(diff <= SGD_BOUND, "synchronized, N = {n}: {diff}"),
                false => assert!(diff > 100.0 * SGD_BOUND, "per-rank, N = {n}: {diff}"),
            }
        }
    }
}

/// A Keras model saved with `BatchNormalization(synchronized=True)` (by Keras on TensorFlow,
/// tests/fixtures/keras/make_synchronized_bn.py) imports with the option on: N = 2 ranks
/// train it to one process's weights (per-rank statistics would end far off, as above); and
/// kiln's export writes the option back, so the re-imported copy trains the same way.
#[test]
fn keras_synchronized_batch_norm_imports_with_the_option() {
    let path = std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/keras/synchronized_bn.keras"
    ));
    let exported = std::env::temp_dir().join(format!("kiln-sync-bn-{}.keras", std::process::id()));
    Model::from_keras(&path)
        .unwrap()
        .save_keras(&exported)
        .unwrap();
    let run = |file: &std::path::Path, comm: Option<SharedCommunicator>| -> kiln::Result<Trained> {
        let mut model = Model::from_keras(file)?;
        model.compile(
            Compile::new(Sgd::new(0.05))
                .loss(SparseCategoricalCrossentropy::new().from_logits(true)),
        )?;
        let data = kiln::data::digits(&Device::Cpu)?.slice(0, 200)?;
        let mut fit = Fit::new().epochs(5).batch_size(40).seed(2).quiet();
        if let Some(c) = comm {
            fit = fit.distributed(c);
        }
        let history = model.fit(&data, fit)?;
        Ok((weights(&model), history))
    };
    for file in [&path, &exported] {
        let (alone, _) = run(file, None).unwrap();
        let ranks: Vec<Trained> = on_ranks(2, |c| run(file, Some(c)))
            .into_iter()
            .collect::<kiln::Result<_>>()
            .unwrap();
        let diff = max_difference(&ranks[0].0, &alone);
        eprintln!(
            "{}: N = 2: largest weight difference {diff:.3e}",
            file.display()
        );
        assert!(diff <= SGD_BOUND, "{}: {diff}", file.display());
    }
    std::fs::remove_file(&exported).unwrap();
}

/// Two heads on 240 digits (the digit, and whether it is 5 or more) with an L2 penalty, a
/// loss weighting strategy over the three terms, and gradient diagnostics; 50 steps.
fn weighted_run(strategy: &str, comm: Option<SharedCommunicator>) -> kiln::Result<Trained> {
    use kiln::loss_weighting::{DynamicWeightAverage, Famo, Strategy, Uncertainty};
    let data = digits_and_big()?;
    let x = Input::new([64]);
    let h = Dense::new(32)
        .activation(Activation::Relu)
        .kernel_regularizer(L2::new(1e-3))
        .apply(&x)?;
    let mut model = two_heads(&x, &h)?;
    let boxed: Box<dyn Strategy> = match strategy {
        "uncertainty" => Box::new(Uncertainty::new()),
        "dwa" => Box::new(DynamicWeightAverage::new()),
        _ => Box::new(Famo::new()),
    };
    model.compile(
        two_head_losses()
            .loss_weighting_boxed(boxed)
            .weight_added_terms(true),
    )?;
    fit_with_diagnostics(&mut model, &data, comm)
}

/// 240 digits with two targets: the digit, and whether it is 5 or more (`big`, one column).
fn digits_and_big() -> kiln::Result<Dataset> {
    let digits = kiln::data::digits(&Device::Cpu)?.slice(0, 240)?;
    let label = digits.targets()[0].clone();
    let big = label
        .ge(5.0)?
        .to_dtype(candle_core::DType::F32)?
        .reshape(((), 1))?;
    Dataset::multi(digits.inputs().to_vec(), vec![label, big])
}

/// The heads of [`digits_and_big`] on the trunk `h` of input `x`: `digit` (10 logits) and
/// `big` (one logit), the model built from seed 3.
fn two_heads(x: &SymbolicTensor, h: &SymbolicTensor) -> kiln::Result<Model> {
    let digit = Dense::new(10).with_name("digit").apply(h)?;
    let big = Dense::new(1).with_name("big").apply(h)?;
    Model::builder(&[x], &[digit, big]).seed(3).build()
}

/// SGD with momentum over the two heads' crossentropies, from logits.
fn two_head_losses() -> Compile {
    Compile::new(Sgd::new(0.05).momentum(0.9))
        .loss_for(
            "digit",
            SparseCategoricalCrossentropy::new().from_logits(true),
        )
        .loss_for("big", BinaryCrossentropy::new().from_logits(true))
}

/// 10 epochs of batches of 50 (seed 11) with gradient diagnostics, on the ranks of `comm` when
/// given: 50 steps.
fn fit_with_diagnostics(
    model: &mut Model,
    data: &Dataset,
    comm: Option<SharedCommunicator>,
) -> kiln::Result<Trained> {
    let mut fit = Fit::new()
        .epochs(10)
        .batch_size(50)
        .seed(11)
        .gradient_diagnostics(true)
        .quiet();
    if let Some(c) = comm {
        fit = fit.distributed(c);
    }
    let history = model.fit(data, fit)?;
    Ok((weights(model), history))
}

/// With Uncertainty (its log-variances trained with the weights), DWA (weights from the
/// epochs' mean terms) and FAMO (weights from each step's terms before and after its update),
/// N = 2 and 3 ranks end with one process's weights, term weights and gradient diagnostics:
/// every rank's strategy sees the global batch's terms, and the per-term gradients are summed
/// over the ranks before their norms and cosines are taken.
#[test]
fn loss_weighting_and_gradient_diagnostics_match_one_process() {
    for strategy in ["uncertainty", "dwa", "famo"] {
        let (alone, history) = weighted_run(strategy, None).unwrap();
        let keys: Vec<String> = history.epochs[0]
            .iter()
            .map(|(k, _)| k.to_string())
            .filter(|k| k != "epoch_time_s")
            .collect();
        for prefix in ["loss_weight/", "grad_norm/", "grad_cos/"] {
            assert!(
                keys.iter().any(|k| k.starts_with(prefix)),
                "{strategy}: {keys:?}"
            );
        }
        // The strategy moved the weights of the terms away from where they started.
        let first = history.epochs[0].get("loss_weight/l2").unwrap();
        let last = history.last().unwrap().get("loss_weight/l2").unwrap();
        assert!((first - last).abs() > 1e-3, "{strategy}: {first} {last}");
        for n in [2, 3] {
            let ranks: Vec<Trained> = on_ranks(n, |c| weighted_run(strategy, Some(c)))
                .into_iter()
                .collect::<kiln::Result<_>>()
                .unwrap();
            for (r, (w, h)) in ranks.iter().enumerate() {
                assert_eq!(
                    w, &ranks[0].0,
                    "{strategy}: rank {r} of {n} differs from rank 0"
                );
                assert_eq!(
                    h.without("epoch_time_s"),
                    ranks[0].1.without("epoch_time_s")
                );
            }
            let diff = max_difference(&ranks[0].0, &alone);
            let mut worst = 0f64;
            for (got, want) in ranks[0].1.epochs.iter().zip(&history.epochs) {
                for key in &keys {
                    let (g, w) = (got.get(key).unwrap(), want.get(key).unwrap());
                    worst = worst.max((g - w).abs() / w.abs().max(1.0));
                }
            }
            eprintln!(
                "{strategy}: N = {n}: largest weight difference {diff:.3e}, largest log \
                 difference {worst:.3e}"
            );
            assert!(diff <= SGD_BOUND, "{strategy}: N = {n}: {diff}");
            assert!(worst <= 1e-4, "{strategy}: N = {n}: logs off by {worst}");
        }
    }
}

/// Everything that talks across ranks inside a step, together: a synchronised
/// BatchNormalization (all-reduces in its forward and backward passes, also in the attack's
/// passes and in every per-term backward pass of the diagnostics), an FGSM term (each rank
/// attacks its own samples), FAMO (its after-update pass) and gradient diagnostics. N = 2 and
/// 3 end within [`SGD_BOUND`] of one process, with its logs.
#[test]
fn synchronized_batch_norm_with_an_attack_famo_and_diagnostics_matches_one_process() {
    let run = |comm: Option<SharedCommunicator>| -> kiln::Result<Trained> {
        let data = digits_and_big()?;
        let x = Input::new([64]);
        let h = Dense::new(32).apply(&x)?;
        let h = BatchNormalization::new()
            .momentum(0.9)
            .synchronized(true)
            .apply(&h)?;
        let h = kiln::layers::ActivationLayer::new(Activation::Relu).apply(&h)?;
        let mut model = two_heads(&x, &h)?;
        model.add_loss_term("fgsm", Adversarial::fgsm(0.05).multiplier(0.5))?;
        model.compile(two_head_losses().loss_weighting(kiln::loss_weighting::Famo::new()))?;
        fit_with_diagnostics(&mut model, &data, comm)
    };
    let (alone, history) = run(None).unwrap();
    let keys: Vec<String> = history.epochs[0]
        .iter()
        .map(|(k, _)| k.to_string())
        .filter(|k| k != "epoch_time_s")
        .collect();
    assert!(keys.iter().any(|k| k == "fgsm"), "{keys:?}");
    assert!(
        keys.iter().any(|k| k == "grad_cos/digit_loss/fgsm"),
        "{keys:?}"
    );
    for n in [2, 3] {
        let ranks: Vec<Trained> = on_ranks(n, |c| run(Some(c)))
            .into_iter()
            .collect::<kiln::Result<_>>()
            .unwrap();
        let diff = max_difference(&ranks[0].0, &alone);
        let mut worst = 0f64;
        for (got, want) in ranks[0].1.epochs.iter().zip(&history.epochs) {
            for key in &keys {
                let (g, w) = (got.get(key).unwrap(), want.get(key).unwrap());
                worst = worst.max((g - w).abs() / w.abs().max(1.0));
            }
        }
        eprintln!(
            "synchronized BN + FGSM + FAMO + diagnostics: N = {n}: weights {diff:.3e}, logs \
             {worst:.3e}"
        );
        assert!(diff <= SGD_BOUND, "N = {n}: {diff}");
        assert!(worst <= 1e-4, "N = {n}: logs off by {worst}");
    }
}

/// Validation gradient diagnostics under data parallel training: every rank evaluates the
/// whole validation set itself, on weights that are one process's up to summation order, so
/// N = 2 and 3 log one process's `val_grad_norm/*` and `val_grad_cos/*` (three terms: the two
/// heads' losses and an FGSM term, with an L2 penalty as the fourth), every rank the same
/// values, within the bound of the training logs (1e-4 relative); the validation gradients are
/// not summed over the ranks (that would multiply each norm by N).
#[test]
fn validation_gradient_diagnostics_match_one_process() {
    let run = |comm: Option<SharedCommunicator>| -> kiln::Result<Trained> {
        let data = digits_and_big()?;
        let x = Input::new([64]);
        let h = Dense::new(32)
            .activation(Activation::Relu)
            .kernel_regularizer(L2::new(1e-3))
            .apply(&x)?;
        let mut model = two_heads(&x, &h)?;
        model.add_loss_term("fgsm", Adversarial::fgsm(0.05).multiplier(0.5))?;
        model.compile(two_head_losses())?;
        // 192 training rows: batches of 50, 50, 50 and 42 (uneven shards at N = 3), 40 steps;
        // the 48 validation rows evaluated whole on every rank.
        let mut fit = Fit::new()
            .epochs(10)
            .batch_size(50)
            .seed(11)
            .validation_split(0.2)
            .gradient_diagnostics(true)
            .validation_gradient_diagnostics(true)
            .quiet();
        if let Some(c) = comm {
            fit = fit.distributed(c);
        }
        let history = model.fit(&data, fit)?;
        Ok((weights(&model), history))
    };
    let (alone, history) = run(None).unwrap();
    let keys: Vec<String> = history.epochs[0]
        .iter()
        .map(|(k, _)| k.to_string())
        .filter(|k| k.starts_with("val_grad_") || k.starts_with("grad_"))
        .collect();
    for key in [
        "val_grad_norm/digit_loss",
        "val_grad_norm/big_loss",
        "val_grad_norm/l2",
        "val_grad_norm/fgsm",
        "val_grad_cos/digit_loss/big_loss",
        "val_grad_cos/big_loss/fgsm",
    ] {
        assert!(keys.iter().any(|k| k == key), "no {key}: {keys:?}");
    }
    for n in [2, 3] {
        let ranks: Vec<Trained> = on_ranks(n, |c| run(Some(c)))
            .into_iter()
            .collect::<kiln::Result<_>>()
            .unwrap();
        for (r, (w, h)) in ranks.iter().enumerate() {
            assert_eq!(w, &ranks[0].0, "N = {n}: rank {r} differs from rank 0");
            assert_eq!(
                h.without("epoch_time_s"),
                ranks[0].1.without("epoch_time_s"),
                "N = {n}: rank {r} logs differ from rank 0's"
            );
        }
        let diff = max_difference(&ranks[0].0, &alone);
        let (mut worst, mut worst_val) = (0f64, 0f64);
        for (got, want) in ranks[0].1.epochs.iter().zip(&history.epochs) {
            for key in &keys {
                let (g, w) = (got.get(key).unwrap(), want.get(key).unwrap());
                let off = (g - w).abs() / w.abs().max(1.0);
                assert!(off <= 1e-4, "N = {n}: {key} {g} vs one process {w}");
                worst = worst.max(off);
                if key.starts_with("val_") {
                    worst_val = worst_val.max(off);
                }
            }
        }
        eprintln!(
            "validation gradient diagnostics: N = {n}: weights {diff:.3e}, largest val_grad_* \
             difference {worst_val:.3e}, largest of all diagnostics {worst:.3e}"
        );
        assert!(diff <= SGD_BOUND, "N = {n}: {diff}");
    }
}

/// PCGrad and GradNorm combine one batch's per-term gradients, which data-parallel ranks do
/// not gather: every rank refuses, naming the strategy, instead of projecting shards.
#[test]
fn gradient_combining_strategies_refuse_data_parallel_training() {
    for strategy in ["pcgrad", "gradnorm"] {
        let results = on_ranks(2, |comm| {
            let data = kiln::data::digits(&Device::Cpu)?.slice(0, 40)?;
            let parity = data.targets()[0].affine(0.0, 1.0)?.unsqueeze(1)?;
            let data = Dataset::multi(
                data.inputs().to_vec(),
                vec![data.targets()[0].clone(), parity],
            )?;
            let x = Input::new([64]);
            let h = Dense::new(8).activation(Activation::Relu).apply(&x)?;
            let a = Dense::new(10).with_name("a").apply(&h)?;
            let b = Dense::new(1).with_name("b").apply(&h)?;
            let mut model = Model::new(&[x], &[a, b])?;
            let s: Box<dyn kiln::loss_weighting::Strategy> = match strategy {
                "pcgrad" => Box::new(kiln::loss_weighting::PCGrad::new()),
                _ => Box::new(kiln::loss_weighting::GradNorm::new()),
            };
            model.compile(
                Compile::new(Sgd::new(0.1))
                    .loss_for("a", SparseCategoricalCrossentropy::new().from_logits(true))
                    .loss_for("b", "mse")
                    .loss_weighting_boxed(s),
            )?;
            model.fit(&data, Fit::new().quiet().distributed(comm))
        });
        for r in results {
            let err = r.map(|_| ()).unwrap_err().to_string();
            assert!(
                err.contains(&format!("`{strategy}`")) && err.contains("data-parallel"),
                "{err}"
            );
        }
    }
}
