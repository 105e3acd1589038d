//! W1 trained data-parallel (`mpirun -np N kiln-dist`) or alone (`kiln-dist`): steps per
//! second of `fit` at a global batch, and the cost of the step's all-reduce alone (the
//! flat buffer of W1's gradients, timed over MPI). Prints one JSON line (rank 0).

use candle_core::{Device, Tensor};
use clap::Parser;
use kiln::distributed::mpi::MpiWorld;
use kiln::distributed::{Communicator, SharedCommunicator};
use kiln::prelude::*;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::Instant;

#[path = "../../../src/allocator.rs"]
mod allocator;

#[derive(Parser)]
struct Args {
    /// The global batch size.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Timed steps (one epoch of `steps` global batches, after one warm-up epoch of 10).
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// All-reduces of W1's gradient buffer to time alone.
    #[arg(long, default_value_t = 200)]
    reduces: usize,
}

fn data(n: usize) -> kiln::Result<Dataset> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let x: Vec<f32> = (0..n * 784).map(|_| rng.random::<f32>()).collect();
    let y: Vec<f32> = (0..n).map(|_| rng.random_range(0..10) as f32).collect();
    Dataset::new(
        Tensor::from_vec(x, (n, 784), &Device::Cpu)?,
        Tensor::from_vec(y, n, &Device::Cpu)?,
    )
}

fn w1() -> kiln::Result<Model> {
    let x = Input::new([784]);
    let h = Dense::new(512).activation(Activation::Relu).apply(&x)?;
    let h = Dense::new(512).activation(Activation::Relu).apply(&h)?;
    let y = Dense::new(10).apply(&h)?;
    let mut model = Model::new(&[x], &[y])?;
    model.compile(
        Compile::new(Adam::new(1e-3)).loss(SparseCategoricalCrossentropy::new().from_logits(true)),
    )?;
    Ok(model)
}

fn main() -> kiln::Result<()> {
    allocator::keep_freed_memory_between_steps();
    kiln::runtime::configure_cpu_threads();
    let args = Args::parse();
    let world: Option<SharedCommunicator> = MpiWorld::init()?.map(|w| Arc::new(w) as _);
    let (rank, ranks) = world.as_ref().map_or((0, 1), |w| (w.rank(), w.size()));
    let mut model = w1()?;
    let params: usize = model.weights().iter().map(|w| w.var.elem_count()).sum();
    let fit = |epochs_data: usize| {
        let mut f = Fit::new().batch_size(args.batch).shuffle(false).quiet();
        if let Some(w) = &world {
            f = f.distributed(w.clone());
        }
        (data(epochs_data * args.batch), f)
    };
    let (warm, f) = fit(10);
    model.fit(&warm?, f)?;
    let (timed, f) = fit(args.steps);
    let timed = timed?;
    let start = Instant::now();
    model.fit(&timed, f)?;
    let step_s = start.elapsed().as_secs_f64() / args.steps as f64;
    // The step's all-reduce alone: W1's gradients and the loss value, f32.
    let mut reduce_s = 0.0;
    if let Some(w) = &world {
        let mut buffer = vec![1e-3f32; params + 1];
        for _ in 0..10 {
            w.all_reduce_f32(&mut buffer)?;
        }
        let start = Instant::now();
        for _ in 0..args.reduces {
            w.all_reduce_f32(&mut buffer)?;
        }
        reduce_s = start.elapsed().as_secs_f64() / args.reduces as f64;
    }
    if rank == 0 {
        println!(
            "{}",
            serde_json::json!({
                "workload": "W1-distributed",
                "ranks": ranks,
                "threads_per_rank": std::env::var("RAYON_NUM_THREADS").unwrap_or_default(),
                "global_batch": args.batch,
                "steps_per_s": 1.0 / step_s,
                "step_ms": step_s * 1e3,
                "all_reduce_bytes": (params + 1) * 4,
                "all_reduce_ms": reduce_s * 1e3,
            })
        );
    }
    Ok(())
}
