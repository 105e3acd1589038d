//! Ranks as threads of one process: the same collectives as MPI, summed in rank order, for
//! checking data-parallel training without an MPI installation.

use super::Communicator;
use crate::error::{Error, Result};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// A group of `n` ranks in one process; give each to a thread that runs the same `fit`.
///
/// A collective waits at most [`LocalGroup::TIMEOUT`] for the other ranks, and fails at once
/// once a rank has failed ([`Communicator::fail`]), naming that rank: a rank's error never
/// leaves the others waiting.
///
/// ```
/// use kiln::distributed::{Communicator, LocalGroup};
/// let ranks = LocalGroup::new(3);
/// assert_eq!((ranks[2].rank(), ranks[2].size()), (2, 3));
/// ```
#[derive(Clone)]
pub struct LocalGroup {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    size: usize,
    state: Mutex<State>,
    turn: Condvar,
}

#[derive(Default)]
struct State {
    /// Completed collectives; a rank waits for this to move on.
    generation: u64,
    arrived: usize,
    /// Each rank's contribution to the collective under way.
    parts: Vec<Option<Vec<f64>>>,
    /// The last collective's result (the parts in rank order).
    result: Arc<Vec<Vec<f64>>>,
    failed: Option<String>,
}

impl std::fmt::Debug for LocalGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalGroup(rank {} of {})", self.rank, self.shared.size)
    }
}

impl LocalGroup {
    /// How long a rank waits in a collective for the others before it fails.
    pub const TIMEOUT: Duration = Duration::from_secs(300);

    /// The `n` ranks of a new group.
    ///
    /// # Panics
    /// If `n` is 0.
    pub fn new(n: usize) -> Vec<LocalGroup> {
        assert!(n > 0, "a LocalGroup needs at least one rank");
        let shared = Arc::new(Shared {
            size: n,
            state: Mutex::new(State {
                parts: vec![None; n],
                ..State::default()
            }),
            turn: Condvar::new(),
        });
        (0..n)
            .map(|rank| LocalGroup {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Every rank's `part`, in rank order, once all have given theirs.
    fn exchange(&self, part: Vec<f64>) -> Result<Arc<Vec<Vec<f64>>>> {
        let shared = &*self.shared;
        let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(why) = &state.failed {
            return Err(Error::Distributed(why.clone()));
        }
        let generation = state.generation;
        state.parts[self.rank] = Some(part);
        state.arrived += 1;
        if state.arrived == shared.size {
            let parts: Vec<Vec<f64>> = state.parts.iter_mut().filter_map(Option::take).collect();
            state.result = Arc::new(parts);
            state.arrived = 0;
            state.generation += 1;
            shared.turn.notify_all();
            return Ok(state.result.clone());
        }
        loop {
            let (next, timeout) = shared
                .turn
                .wait_timeout(state, Self::TIMEOUT)
                .unwrap_or_else(|e| e.into_inner());
            state = next;
            if state.generation != generation {
                return Ok(state.result.clone());
            }
            if let Some(why) = &state.failed {
                return Err(Error::Distributed(why.clone()));
            }
            if timeout.timed_out() {
                return Err(Error::Distributed(format!(
                    "rank {} of {} waited {} s in a collective for the other ranks: one of them \
                     stopped without failing",
                    self.rank,
                    shared.size,
                    Self::TIMEOUT.as_secs()
                )));
            }
        }
    }
}

impl Communicator for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.shared.size
    }
    fn all_reduce_f32(&self, buffer: &mut [f32]) -> Result<()> {
        let parts = self.exchange(buffer.iter().map(|&v| f64::from(v)).collect())?;
        check_lengths(&parts, buffer.len())?;
        for (i, slot) in buffer.iter_mut().enumerate() {
            // Summed in f32, in rank order, as one process would add the shards' sums.
            *slot = parts.iter().fold(-0.0f32, |acc, p| acc + p[i] as f32);
        }
        Ok(())
    }
    fn all_reduce_f64(&self, buffer: &mut [f64]) -> Result<()> {
        let parts = self.exchange(buffer.to_vec())?;
        check_lengths(&parts, buffer.len())?;
        for (i, slot) in buffer.iter_mut().enumerate() {
            *slot = parts.iter().fold(-0.0f64, |acc, p| acc + p[i]);
        }
        Ok(())
    }
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        // Two exact halves: an f64 holds any 32-bit integer.
        let parts = self.exchange(vec![(value >> 32) as f64, (value & 0xFFFF_FFFF) as f64])?;
        Ok(parts
            .iter()
            .map(|p| ((p[0] as u64) << 32) | p[1] as u64)
            .collect())
    }
    fn in_process(&self) -> bool {
        true
    }
    fn fail(&self, error: &Error) {
        let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.failed.is_none() {
            state.failed = Some(format!(
                "rank {} of {} failed: {error}",
                self.rank, self.shared.size
            ));
        }
        self.shared.turn.notify_all();
    }
}

fn check_lengths(parts: &[Vec<f64>], len: usize) -> Result<()> {
    match parts.iter().position(|p| p.len() != len) {
        Some(r) => Err(Error::Distributed(format!(
            "rank {r} gave {} values to an all-reduce of {len}: the ranks run different models \
             or data",
            parts[r].len()
        ))),
        None => Ok(()),
    }
}
