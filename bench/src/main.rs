//! kiln's side of the benchmark: trains the workloads of bench/README.md on fixed synthetic
//! data and prints one JSON line per workload with steps per second and peak memory.

use candle_core::{Device, Tensor};
use clap::Parser;
use kiln::prelude::*;
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// The `kiln` command's allocator and its settings, from the same file.
#[path = "../../src/allocator.rs"]
mod allocator;

#[derive(Parser)]
struct Args {
    /// Workloads to run: W1, W2, W3 (batch × width grid), W4 (W1, run under load by run.sh),
    /// C1, C2 (convolutional), R1, R2 (recurrent), P1-C1, P1-W1 (predict, samples/s),
    /// T1-sigmoid, T1-logits, T1-softmax, T1-softmax-logits (tabular, probabilities or logits),
    /// D1 (gradient diagnostics off and on, interleaved, through `fit`: `--diagnostic-terms`).
    #[arg(long, value_delimiter = ',', default_value = "W1,W2,W3")]
    workloads: Vec<String>,
    /// Timed steps per measurement (after 10 warm-up steps).
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Timed steps (predict: batches) of C1, C2, R1, R2 and P1-C1 (default: steps / 10, at
    /// least 3; P1-C1 at least 1).
    #[arg(long)]
    model_steps: Option<usize>,
    /// Warm-up steps of C1, C2, R1, R2 (at most 1 predict of P1-*).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// D1: the numbers of terms (heads on one trunk) to measure.
    #[arg(long, value_delimiter = ',', default_value = "2,3,5")]
    diagnostic_terms: Vec<usize>,
    /// D1: interleaved rounds (off, on) per number of terms; medians over them.
    #[arg(long, default_value_t = 7)]
    diagnostic_rounds: usize,
}

/// Fixed synthetic data: 784 features in [0, 1), 10 classes, one-hot labels.
fn batch(batch: usize, seed: u64) -> kiln::Result<Dataset> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let x: Vec<f32> = (0..batch * 784).map(|_| rng.random::<f32>()).collect();
    let mut y = vec![0f32; batch * 10];
    for i in 0..batch {
        y[i * 10 + rng.random_range(0..10)] = 1.0;
    }
    Dataset::new(
        Tensor::from_vec(x, (batch, 784), &Device::Cpu)?,
        Tensor::from_vec(y, (batch, 10), &Device::Cpu)?,
    )
}

fn mlp(width: usize, l2: Option<f64>) -> kiln::Result<Model> {
    let x = Input::new([784]);
    let dense = |units: usize| {
        let d = Dense::new(units);
        match l2 {
            Some(f) => d.kernel_regularizer(L2::new(f)),
            None => d,
        }
    };
    let h = dense(width).activation(Activation::Relu).apply(&x)?;
    let h = dense(width).activation(Activation::Relu).apply(&h)?;
    let y = dense(10).apply(&h)?;
    Model::new(&[x], &[y])
}

/// FLOPs of one plain step: forward 2·m·k·n per layer, backward twice that (no dX for layer 1).
fn flops_per_step(batch: usize, width: usize, passes: f64) -> f64 {
    let layers = [(784, width), (width, width), (width, 10)];
    let mut total = 0.0;
    for (i, (k, n)) in layers.iter().enumerate() {
        let fwd = 2.0 * (batch * k * n) as f64;
        let bwd = if i == 0 { fwd } else { 2.0 * fwd };
        total += fwd + bwd;
    }
    total * passes
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn measure(
    name: &str,
    batch_size: usize,
    width: usize,
    mission: bool,
    steps: usize,
) -> kiln::Result<()> {
    let mut model = mlp(width, mission.then_some(0.01))?;
    if mission {
        model.add_loss_term("adversarial", Adversarial::fgsm(0.05).multiplier(0.5))?;
        model.compile(
            Compile::new(Adam::new(1e-3)).loss(
                CategoricalFocalCrossentropy::new()
                    .gamma(2.0)
                    .from_logits(true),
            ),
        )?;
    } else {
        model.compile(
            Compile::new(Adam::new(1e-3)).loss(CategoricalCrossentropy::new().from_logits(true)),
        )?;
    }
    let data = batch(batch_size, 1)?;
    for _ in 0..10 {
        model.train_on_batch(&data)?;
    }
    let start = Instant::now();
    let mut last = 0.0;
    for _ in 0..steps {
        last = model.train_on_batch(&data)?.get("loss").unwrap_or(f64::NAN);
    }
    let secs = start.elapsed().as_secs_f64();
    let steps_per_s = steps as f64 / secs;
    let passes = if mission { 2.0 } else { 1.0 };
    println!(
        "{}",
        serde_json::json!({
            "engine": "kiln", "workload": name, "batch": batch_size, "width": width,
            "steps_per_s": steps_per_s, "gflops": flops_per_step(batch_size, width, passes) * steps_per_s / 1e9,
            "peak_rss_mb": peak_rss_mb(), "final_loss": last,
        })
    );
    Ok(())
}

/// D1's model: W2's trunk (784-512-512, ReLU) shared by `heads` Dense(10) heads, each with
/// its own categorical crossentropy (from logits) on the same labels: `heads` terms, each of
/// whose gradients reaches the whole trunk.
fn heads_model(heads: usize) -> kiln::Result<Model> {
    let x = Input::new([784]);
    let h = Dense::new(512).activation(Activation::Relu).apply(&x)?;
    let h = Dense::new(512).activation(Activation::Relu).apply(&h)?;
    let outs: Vec<_> = (0..heads)
        .map(|i| Dense::new(10).with_name(format!("head{i}")).apply(&h))
        .collect::<kiln::Result<_>>()?;
    let mut model = Model::builder(&[&x], &outs).build()?;
    let mut compile = Compile::new(Adam::new(1e-3));
    for i in 0..heads {
        compile = compile.loss_for(
            format!("head{i}"),
            CategoricalCrossentropy::new().from_logits(true),
        );
    }
    model.compile(compile)?;
    Ok(model)
}

/// Counted passes: the step time with diagnostics on over off if time were proportional to
/// the multiply-adds of the products (forward 2·m·k·n per layer, backward twice that but no
/// dX for the first layer). Off: one forward and one backward of the total; on: besides, one
/// backward per term, through the trunk and the term's own head.
fn predicted_ratio(heads: usize) -> f64 {
    let (trunk1, trunk2, head) = (784.0 * 512.0, 512.0 * 512.0, 512.0 * 10.0);
    let k = heads as f64;
    let forward = trunk1 + trunk2 + k * head;
    let backward_total = trunk1 + 2.0 * (trunk2 + k * head);
    let backward_term = trunk1 + 2.0 * (trunk2 + head);
    let off = forward + backward_total;
    (off + k * backward_term) / off
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// D1: the cost of gradient diagnostics. For each number of terms in `terms`, two models of
/// [`heads_model`] (the same initial weights) trained through `fit` at batch 128, one with
/// `gradient_diagnostics` off (A) and one on (B), in interleaved rounds A, B, A, B, … of
/// `steps` steps each, so that a change of the machine's load falls on both alike. Prints, per
/// number of terms, the median step time of each, their ratio (on / off), the median of the
/// rounds' pairwise ratios, and the ratio counted passes predict.
fn measure_diagnostics(steps: usize, rounds: usize, terms: &[usize]) -> kiln::Result<()> {
    let steps = steps.max(2);
    let data = batch(128 * steps, 1)?;
    for &k in terms {
        let targets = vec![data.targets()[0].clone(); k];
        let data = Dataset::multi(data.inputs().to_vec(), targets)?;
        let fit = Fit::new().batch_size(128).shuffle(false).quiet();
        let mut models = [heads_model(k)?, heads_model(k)?];
        for (on, model) in models.iter_mut().enumerate() {
            // Warm-up: two steps each, in the mode it is timed in.
            model.fit(
                &data.slice(0, 128 * 2)?,
                fit.clone().gradient_diagnostics(on == 1),
            )?;
        }
        let mut ms = [Vec::new(), Vec::new()];
        for _ in 0..rounds.max(1) {
            for (on, model) in models.iter_mut().enumerate() {
                let start = Instant::now();
                model.fit(&data, fit.clone().gradient_diagnostics(on == 1))?;
                ms[on].push(start.elapsed().as_secs_f64() * 1e3 / steps as f64);
            }
        }
        let pairs: Vec<f64> = ms[1].iter().zip(&ms[0]).map(|(b, a)| b / a).collect();
        let (off, on) = (median(&ms[0]), median(&ms[1]));
        println!(
            "{}",
            serde_json::json!({
                "engine": "kiln", "workload": "D1", "terms": k, "batch": 128, "width": 512,
                "steps_per_round": steps, "rounds": rounds,
                "ms_per_step_off": off, "ms_per_step_on": on,
                "ms_per_step_diagnostics": on - off,
                "step_time_ratio_on_off": on / off,
                "median_pairwise_ratio": median(&pairs),
                "predicted_ratio_by_passes": predicted_ratio(k),
                "rounds_ms_off": ms[0], "rounds_ms_on": ms[1],
            })
        );
    }
    Ok(())
}

/// Synthetic images `[batch, 28, 28, 1]` in [0, 1) with one-hot labels of 10 classes.
fn images(batch: usize, seed: u64) -> kiln::Result<Dataset> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let x: Vec<f32> = (0..batch * 784).map(|_| rng.random::<f32>()).collect();
    let mut y = vec![0f32; batch * 10];
    for i in 0..batch {
        y[i * 10 + rng.random_range(0..10)] = 1.0;
    }
    Dataset::new(
        Tensor::from_vec(x, (batch, 28, 28, 1), &Device::Cpu)?,
        Tensor::from_vec(y, (batch, 10), &Device::Cpu)?,
    )
}

/// Synthetic token sequences `[batch, 50]` of ids 1..1000 with one-hot labels of 2 classes.
fn tokens(batch: usize, seed: u64) -> kiln::Result<Dataset> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let x: Vec<f32> = (0..batch * 50)
        .map(|_| rng.random_range(1..1000) as f32)
        .collect();
    let mut y = vec![0f32; batch * 2];
    for i in 0..batch {
        y[i * 2 + rng.random_range(0..2)] = 1.0;
    }
    Dataset::new(
        Tensor::from_vec(x, (batch, 50), &Device::Cpu)?,
        Tensor::from_vec(y, (batch, 2), &Device::Cpu)?,
    )
}

/// C1 (and C2 with `batch_norm`): Conv2D 32 3×3 relu → MaxPool 2 → Conv2D 64 3×3 relu →
/// MaxPool 2 → Flatten → Dense 128 relu → Dense 10. With BatchNormalization after each
/// convolution, before its relu.
fn cnn(batch_norm: bool) -> kiln::Result<Model> {
    let x = Input::new([28, 28, 1]);
    let mut h = x.clone();
    for filters in [32, 64] {
        h = if batch_norm {
            let c = Conv2D::new(filters, (3, 3)).apply(&h)?;
            let n = BatchNormalization::new().apply(&c)?;
            ActivationLayer::new(Activation::Relu).apply(&n)?
        } else {
            Conv2D::new(filters, (3, 3))
                .activation(Activation::Relu)
                .apply(&h)?
        };
        h = MaxPooling2D::new((2, 2)).apply(&h)?;
    }
    let h = Flatten::new().apply(&h)?;
    let h = Dense::new(128).activation(Activation::Relu).apply(&h)?;
    let y = Dense::new(10).apply(&h)?;
    Model::new(&[x], &[y])
}

/// R1 (LSTM) and R2 (GRU): Embedding(1000, 64) → LSTM/GRU 128 (last output) → Dense 2.
fn rnn(gru: bool) -> kiln::Result<Model> {
    let x = Input::new([50]);
    let e = Embedding::new(1000, 64).apply(&x)?;
    let h = if gru {
        Gru::new(128).apply(&e)?
    } else {
        Lstm::new(128).apply(&e)?
    };
    let y = Dense::new(2).apply(&h)?;
    Model::new(&[x], &[y])
}

/// The number of values in the model's weights (trainable or not), as Keras' `count_params`.
fn param_count(model: &Model) -> usize {
    model.weights().iter().map(|w| w.var.elem_count()).sum()
}

/// Trains `model` on `data` (Adam 1e-3, cross-entropy from logits) and prints steps/s.
fn measure_model(
    name: &str,
    mut model: Model,
    data: &Dataset,
    steps: usize,
    warmup: usize,
) -> kiln::Result<()> {
    let params = param_count(&model);
    model.compile(
        Compile::new(Adam::new(1e-3)).loss(CategoricalCrossentropy::new().from_logits(true)),
    )?;
    for _ in 0..warmup {
        model.train_on_batch(data)?;
    }
    let start = Instant::now();
    let mut last = 0.0;
    for _ in 0..steps {
        last = model.train_on_batch(data)?.get("loss").unwrap_or(f64::NAN);
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "engine": "kiln", "workload": name, "batch": data.len(), "params": params,
            "steps_per_s": steps as f64 / secs, "peak_rss_mb": peak_rss_mb(), "final_loss": last,
        })
    );
    Ok(())
}

/// Predicts `repeats` batches of 1024 samples and prints samples/s (as `steps_per_s`).
fn measure_predict(
    name: &str,
    model: Model,
    x: Tensor,
    repeats: usize,
    warmup: usize,
) -> kiln::Result<()> {
    let n = x.dims()[0];
    for _ in 0..warmup {
        model.predict(std::slice::from_ref(&x), n)?;
    }
    let start = Instant::now();
    for _ in 0..repeats {
        model.predict(std::slice::from_ref(&x), n)?;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "engine": "kiln", "workload": name, "batch": n, "params": param_count(&model),
            "steps_per_s": (repeats * n) as f64 / secs, "peak_rss_mb": peak_rss_mb(),
        })
    );
    Ok(())
}

/// Tabular data as in the breast-cancer baseline: 30 standardized features, 0/1 labels (as one
/// column, or one-hot over two for the softmax variants).
fn tabular(batch: usize, one_hot: bool, seed: u64) -> kiln::Result<Dataset> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let x: Vec<f32> = (0..batch * 30)
        .map(|_| rng.random::<f32>() * 2.0 - 1.0)
        .collect();
    let labels: Vec<f32> = (0..batch)
        .map(|i| f32::from(x[i * 30] + x[i * 30 + 1] > 0.0))
        .collect();
    let y = match one_hot {
        false => Tensor::from_vec(labels, (batch, 1), &Device::Cpu)?,
        true => Tensor::from_vec(
            labels
                .iter()
                .flat_map(|&l| [1.0 - l, l])
                .collect::<Vec<f32>>(),
            (batch, 2),
            &Device::Cpu,
        )?,
    };
    Dataset::new(Tensor::from_vec(x, (batch, 30), &Device::Cpu)?, y)
}

/// T1: 30 → Dense 16 ReLU (L2 1e-3) → Dense 1 sigmoid with binary crossentropy on
/// probabilities (`T1-sigmoid`), or linear with `from_logits` (`T1-logits`); the softmax
/// variants end in Dense 2 with categorical crossentropy. Adam 1e-3, batch 32.
fn measure_tabular(name: &str, steps: usize) -> kiln::Result<()> {
    let softmax = name.contains("softmax");
    let logits = name.ends_with("logits");
    let x = Input::new([30]);
    let h = Dense::new(16)
        .activation(Activation::Relu)
        .kernel_regularizer(L2::new(1e-3))
        .apply(&x)?;
    let activation = match (softmax, logits) {
        (_, true) => Activation::Linear,
        (true, false) => Activation::Softmax,
        (false, false) => Activation::Sigmoid,
    };
    let y = Dense::new(if softmax { 2 } else { 1 })
        .activation(activation)
        .apply(&h)?;
    let mut model = Model::new(&[x], &[y])?;
    let compile = Compile::new(Adam::new(1e-3));
    model.compile(match softmax {
        true => compile.loss(CategoricalCrossentropy::new().from_logits(logits)),
        false => compile.loss(BinaryCrossentropy::new().from_logits(logits)),
    })?;
    let data = tabular(32, softmax, 1)?;
    for _ in 0..20 {
        model.train_on_batch(&data)?;
    }
    let cpu = cpu_seconds();
    let start = Instant::now();
    let mut last = 0.0;
    for _ in 0..steps {
        last = model.train_on_batch(&data)?.get("loss").unwrap_or(f64::NAN);
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu;
    println!(
        "{}",
        serde_json::json!({
            "engine": "kiln", "workload": name, "batch": 32, "steps_per_s": steps as f64 / secs,
            "cpu_us_per_step": cpu * 1e6 / steps as f64, "final_loss": last,
        })
    );
    Ok(())
}

/// User and system CPU time of this process so far, in seconds (every thread).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime and stime are the 12th
    // and 13th, in clock ticks (100 a second on Linux).
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}

fn main() -> kiln::Result<()> {
    allocator::keep_freed_memory_between_steps();
    kiln::runtime::configure_cpu_threads();
    let args = Args::parse();
    let model_steps = args.model_steps.unwrap_or((args.steps / 10).max(3));
    let warmup = args.warmup;
    for w in &args.workloads {
        match w.as_str() {
            "W1" => measure("W1", 128, 512, false, args.steps)?,
            "W2" => measure("W2", 128, 512, true, args.steps)?,
            "W4" => measure("W4", 128, 512, false, args.steps)?,
            "W3" => {
                for b in [32, 128, 512] {
                    for width in [128, 512, 2048] {
                        measure(
                            &format!("W3-b{b}-w{width}"),
                            b,
                            width,
                            false,
                            (args.steps * 128 / b).clamp(10, 400),
                        )?;
                    }
                }
            }
            "C1" => measure_model("C1", cnn(false)?, &images(128, 1)?, model_steps, warmup)?,
            "C2" => measure_model("C2", cnn(true)?, &images(128, 1)?, model_steps, warmup)?,
            "R1" => measure_model("R1", rnn(false)?, &tokens(64, 1)?, model_steps, warmup)?,
            "R2" => measure_model("R2", rnn(true)?, &tokens(64, 1)?, model_steps, warmup)?,
            "P1-C1" => {
                let x = images(1024, 2)?.inputs()[0].clone();
                let repeats = args.model_steps.unwrap_or((args.steps / 10).max(1));
                measure_predict("P1-C1", cnn(false)?, x, repeats, warmup.min(1))?
            }
            "P1-W1" => {
                let x = batch(1024, 2)?.inputs()[0].clone();
                measure_predict("P1-W1", mlp(512, None)?, x, args.steps, warmup.min(1))?
            }
            t if t.starts_with("T1-") => measure_tabular(t, args.steps)?,
            "D1" => {
                measure_diagnostics(args.steps, args.diagnostic_rounds, &args.diagnostic_terms)?
            }
            other => eprintln!("unknown workload {other}"),
        }
    }
    Ok(())
}
