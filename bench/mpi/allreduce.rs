//! `mpirun -np N allreduce [FLOATS] [REPEATS]`: the time of one `MPI_Allreduce` (sum) of
//! FLOATS f32 values (default: W1's 669,706 parameters and its loss value, the buffer a kiln
//! training step sums), over REPEATS calls after 10 warm-up calls. Rank 0 prints one JSON line.

use mpi::collective::SystemOperation;
use mpi::traits::*;
use std::time::Instant;

fn main() {
    let universe = mpi::initialize().expect("MPI initializes once");
    let world = universe.world();
    let mut args = std::env::args().skip(1);
    let floats: usize = args.next().map_or(669_707, |a| a.parse().expect("FLOATS"));
    let repeats: usize = args.next().map_or(200, |a| a.parse().expect("REPEATS"));
    let send = vec![1e-3f32; floats];
    let mut receive = vec![0f32; floats];
    for _ in 0..10 {
        world.all_reduce_into(&send[..], &mut receive[..], SystemOperation::sum());
    }
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        world.barrier();
        let start = Instant::now();
        world.all_reduce_into(&send[..], &mut receive[..], SystemOperation::sum());
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    if world.rank() == 0 {
        println!(
            "{{\"ranks\": {}, \"bytes\": {}, \"median_ms\": {:.4}, \"p10_ms\": {:.4}, \"p90_ms\": {:.4}}}",
            world.size(),
            floats * 4,
            times[repeats / 2],
            times[repeats / 10],
            times[repeats * 9 / 10]
        );
    }
}
