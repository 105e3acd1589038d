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
            let a = Dense::new(10).name("a").apply(&h)?;
            let b = Dense::new(1).name("b").apply(&h)?;
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
