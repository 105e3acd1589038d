//! The [`Communicator`] on MPI (the `mpi` feature: rsmpi over the system's Open MPI).

use super::Communicator;
use crate::error::{Error, Result};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, CommunicatorCollectives};
use mpi::Threading;

/// `MPI_COMM_WORLD` of a process started by `mpirun`/`srun`. Keep it alive while training:
/// dropping it finalizes MPI.
///
/// ```no_run
/// use kiln::distributed::{mpi::MpiWorld, Communicator};
/// use kiln::prelude::*;
/// # fn data() -> Dataset { unimplemented!() }
/// # fn model() -> Model { unimplemented!() }
/// let world = std::sync::Arc::new(MpiWorld::init()?.expect("run me under mpirun"));
/// let mut model = model();
/// model.fit(&data(), Fit::new().batch_size(256).distributed(world.clone()))?;
/// if world.rank() == 0 {
///     model.save_weights("model.safetensors")?;
/// }
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct MpiWorld {
    world: SimpleCommunicator,
    _universe: Universe,
}

// SAFETY: MPI is initialized with `MPI_THREAD_SERIALIZED`, which allows calls from any thread
// as long as no two run at once; `fit` makes its collectives one after another, from whichever
// thread runs the step.
unsafe impl Send for MpiWorld {}
// SAFETY: as above: kiln never calls into MPI from two threads at once.
unsafe impl Sync for MpiWorld {}

impl MpiWorld {
    /// Initializes MPI when this process was started by an MPI launcher (`mpirun`, `mpiexec`,
    /// `srun`: it sets `OMPI_COMM_WORLD_SIZE`, `PMI_SIZE` or `PMIX_RANK`); `Ok(None)` otherwise,
    /// so that the same program runs alone without MPI.
    ///
    /// # Errors
    /// [`Error::Distributed`] when MPI cannot be initialized, or does not provide the
    /// serialized threading level kiln needs.
    pub fn init() -> Result<Option<MpiWorld>> {
        let launched = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"]
            .iter()
            .any(|v| std::env::var_os(v).is_some());
        if !launched {
            return Ok(None);
        }
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| {
                Error::Distributed(
                    "MPI was already initialized in this process: create one MpiWorld".into(),
                )
            })?;
        if threading < Threading::Serialized {
            return Err(Error::Distributed(format!(
                "this MPI provides threading level {threading:?}, kiln needs Serialized \
                 (MPI_THREAD_SERIALIZED): use an MPI built with thread support"
            )));
        }
        Ok(Some(MpiWorld {
            world: universe.world(),
            _universe: universe,
        }))
    }
}

impl std::fmt::Debug for MpiWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MpiWorld(rank {} of {})", self.rank(), self.size())
    }
}

impl Communicator for MpiWorld {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn size(&self) -> usize {
        self.world.size() as usize
    }
    fn all_reduce_f32(&self, buffer: &mut [f32]) -> Result<()> {
        let send = buffer.to_vec();
        self.world
            .all_reduce_into(&send[..], buffer, SystemOperation::sum());
        Ok(())
    }
    fn all_reduce_f64(&self, buffer: &mut [f64]) -> Result<()> {
        let send = buffer.to_vec();
        self.world
            .all_reduce_into(&send[..], buffer, SystemOperation::sum());
        Ok(())
    }
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        let mut all = vec![0u64; self.size()];
        self.world.all_gather_into(&value, &mut all[..]);
        Ok(all)
    }
    fn fail(&self, error: &Error) {
        // One write, then a moment for mpirun to forward it: written piece by piece (as
        // `eprintln!` does), mpirun's own abort banner landed inside the message.
        let message = format!(
            "error: rank {} of {} failed: {error}\nkiln: ending the run on every rank \
             (MPI_Abort)\n",
            self.rank(),
            self.size()
        );
        {
            use std::io::Write;
            let mut stderr = std::io::stderr().lock();
            let _ = stderr.write_all(message.as_bytes());
            let _ = stderr.flush();
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        self.world.abort(1)
    }
}
