//! kiln's side of the benchmark: trains the workloads of bench/README.md on fixed synthetic
//! data and prints one JSON line per workload with steps per second and peak memory.

use candle_core::{Device, Tensor};
use clap::Parser;
use kiln::prelude::*;
use rand::{Rng, SeedableRng};
use std::time::Instant;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Workloads to run: W1, W2, W3 (batch × width grid), W4 (W1, run under load by run.sh).
    #[arg(long, value_delimiter = ',', default_value = "W1,W2,W3")]
    workloads: Vec<String>,
    /// Timed steps per measurement (after 10 warm-up steps).
    #[arg(long, default_value_t = 100)]
    steps: usize,
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
        model.add_loss("adversarial", Adversarial::fgsm(0.05).multiplier(0.5))?;
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

fn main() -> kiln::Result<()> {
    kiln::runtime::configure_cpu_threads();
    let args = Args::parse();
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
            other => eprintln!("unknown workload {other}"),
        }
    }
    Ok(())
}
