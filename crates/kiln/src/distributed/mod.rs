//! Data-parallel training: one model trained by several processes (ranks), each on its shard of
//! every global batch, with the gradients summed by one all-reduce per step.
//!
//! The engine is a [`Communicator`]: Open MPI through the `mpi` cargo feature
//! (`mpi::MpiWorld`), or [`LocalGroup`], ranks as threads of one process (to check a program,
//! and what the tests use). Give one to [`crate::Fit::distributed`]; every rank runs the same
//! program on the same data:
//!
//! - every rank draws the same shuffle from the seed and takes its contiguous shard of each
//!   global batch (`batch_size` is the global batch size);
//! - every random draw of a training step (Dropout's and the recurrent layers' masks, PGD's
//!   random start) comes from the sample's own stream, keyed by the run's seed, the step, the
//!   layer and the sample's index in the global batch ([`crate::random`]): a sample gets the
//!   same mask whichever rank holds it, so random layers train what one process trains;
//! - the compiled losses divide by the global batch's divisor (its sample count, valid-entry
//!   count under a mask, or its weight sum for `mean_with_sample_weight`), so that the ranks'
//!   losses sum to the one-process loss; added terms count by the rank's share of the batch;
//! - the gradients, the step's term values and the non-trainable weights (BatchNormalization's
//!   moving statistics, taken from rank 0 as PyTorch DDP's buffers are) travel in one flat
//!   buffer, summed by one all-reduce; every rank applies the same optimizer step;
//! - the training metrics' states are summed at each epoch's end; validation runs whole on
//!   every rank, so every rank sees the same logs and callbacks decide alike;
//! - a loss weighting strategy combines the global batch's terms (one all-reduce of one value
//!   per term, inside the graph), so every rank's strategy sees and sets what one process's
//!   does; its own variables (Uncertainty's log-variances) take rank 0's gradient, which is
//!   already the global one;
//! - gradient diagnostics sum each term's gradient over the ranks before taking norms and
//!   cosines (one all-reduce of every term's gradient: diagnostics are opt-in);
//! - a [`BatchNormalization::synchronized`](crate::layers::BatchNormalization::synchronized)
//!   layer takes its statistics over the global batch (one small all-reduce in its forward
//!   pass, one in its backward pass); the others keep per-rank statistics, the default.
//!
//! With one rank, `fit` runs the single-process code itself: bit-identical to no communicator.

mod collective_op;
mod local;
#[cfg(feature = "mpi")]
pub mod mpi;
mod step;

pub(crate) use collective_op::{all_reduce, Adjoint};
pub use local::LocalGroup;
pub(crate) use step::{check_fit, merge_metrics, shard_batch, StepShard};

use crate::error::{Error, Result};
use std::sync::Arc;

/// The collective operations data-parallel training needs, over a fixed group of ranks.
///
/// Every rank must call the same operations in the same order with buffers of the same length;
/// every rank receives the same result.
///
/// ```
/// use kiln::distributed::{Communicator, LocalGroup};
/// let ranks = LocalGroup::new(2);
/// let sums: Vec<Vec<f32>> = std::thread::scope(|s| {
///     let handles: Vec<_> = ranks.iter().map(|r| s.spawn(move || {
///         let mut buffer = vec![r.rank() as f32 + 1.0; 3];
///         r.all_reduce_f32(&mut buffer).map(|()| buffer)
///     })).collect();
///     handles.into_iter().map(|h| h.join().unwrap()).collect::<kiln::Result<_>>()
/// })?;
/// assert_eq!(sums, vec![vec![3.0; 3], vec![3.0; 3]]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub trait Communicator: Send + Sync {
    /// This process's place in the group, from 0.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Replaces `buffer` by its element-wise sum over all ranks.
    fn all_reduce_f32(&self, buffer: &mut [f32]) -> Result<()>;
    /// Replaces `buffer` by its element-wise sum over all ranks.
    fn all_reduce_f64(&self, buffer: &mut [f64]) -> Result<()>;
    /// Every rank's `value`, in rank order.
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>>;
    /// Ends the run on every rank after this one failed with `error`: MPI prints the message
    /// (naming the rank) and aborts the job, so that no rank waits forever in a collective;
    /// [`LocalGroup`] makes the other ranks' pending and later collectives fail instead.
    fn fail(&self, error: &Error);
    /// Whether the ranks are threads of this process ([`LocalGroup`]): their steps then run
    /// on their own threads, not on kiln's shared pool, where a rank waiting in a collective
    /// would hold a thread another rank needs. `false` (the default) for MPI's processes.
    fn in_process(&self) -> bool {
        false
    }
}

/// A shared communicator, as [`crate::Fit::distributed`] takes it.
pub type SharedCommunicator = Arc<dyn Communicator>;

/// `rank r of N` as messages name a rank.
pub(crate) fn rank_name(comm: &dyn Communicator) -> String {
    format!("rank {} of {}", comm.rank(), comm.size())
}

/// The contiguous shard of a global batch of `len` samples that `rank` of `size` trains on:
/// the first `len % size` ranks take one sample more.
///
/// ```
/// use kiln::distributed::shard_range;
/// assert_eq!(shard_range(10, 0, 3), 0..4);
/// assert_eq!(shard_range(10, 1, 3), 4..7);
/// assert_eq!(shard_range(10, 2, 3), 7..10);
/// ```
pub fn shard_range(len: usize, rank: usize, size: usize) -> std::ops::Range<usize> {
    let (base, extra) = (len / size, len % size);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}
