//! What one rank does in a data-parallel step: its shard of the global batch, the losses
//! reduced with the global batch's divisor, and the one all-reduce of gradients, term values
//! and non-trainable weights.

use super::{all_reduce, rank_name, shard_range, Adjoint, Communicator, SharedCommunicator};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::layers::Weight;
use crate::losses::{merged_mask, Loss};
use crate::reduction::{divide_no_nan, reduce_weighted_parts, Reduction};
use candle_core::{DType, Tensor};

/// The global batch a rank's shard belongs to, as the losses of a training step need it.
pub(crate) struct StepShard {
    comm: SharedCommunicator,
    global_len: usize,
    local_len: usize,
    /// The index in the global batch of the shard's first sample: the samples' random streams
    /// are keyed by their global index (`crate::random`).
    first_row: usize,
    /// Σ of the global batch's sample weights (in the model's dtype, summed in f64 as
    /// `mean_with_sample_weight` sums them), when the data has sample weights.
    global_weight_sum: Option<f64>,
}

/// This rank's shard of the global batch `chunk` of `train`, and the step's [`StepShard`].
pub(crate) fn shard_batch(
    train: &Dataset,
    chunk: &[u32],
    comm: &SharedCommunicator,
    dtype: DType,
) -> Result<(Dataset, StepShard)> {
    let range = shard_range(chunk.len(), comm.rank(), comm.size());
    let first_row = range.start;
    let local = train.select(&chunk[range])?;
    if train.has_output_weights() {
        return Err(Error::Data(
            "sample weights per output are not supported in distributed training yet: give one \
             sample weight for every output (Dataset::with_sample_weight), or train in one process"
                .into(),
        ));
    }
    let global_weight_sum = match train.sample_weight() {
        Some(w) => {
            let index = Tensor::from_slice(chunk, chunk.len(), w.device())?;
            let w = w.contiguous()?.index_select(&index, 0)?.to_dtype(dtype)?;
            Some(w.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?)
        }
        None => None,
    };
    let shard = StepShard {
        comm: comm.clone(),
        global_len: chunk.len(),
        local_len: local.len(),
        first_row,
        global_weight_sum,
    };
    Ok((local, shard))
}

impl StepShard {
    /// The number of samples of the global batch.
    pub(crate) fn global_len(&self) -> usize {
        self.global_len
    }

    /// The index in the global batch of the shard's first sample.
    pub(crate) fn first_row(&self) -> usize {
        self.first_row
    }

    /// The ranks' communicator.
    pub(crate) fn communicator(&self) -> &SharedCommunicator {
        &self.comm
    }

    /// Whether the ranks are threads of this process (see [`Communicator::in_process`]).
    pub(crate) fn in_process(&self) -> bool {
        self.comm.in_process()
    }

    /// This rank's share of the global batch: the weight of a term computed on the shard
    /// alone (added terms, which Keras' activity regularizers and mean penalties are means of).
    pub(crate) fn share(&self) -> f64 {
        self.local_len as f64 / self.global_len as f64
    }

    /// The shard's part of a compile-time loss reduced over the global batch: its weighted sum
    /// over the global batch's divisor, so that the ranks' parts sum to the one-process value.
    /// Without a mask the divisor follows from the global batch itself; with one (the valid
    /// entries are only known after the forward pass), the ranks' divisors are summed.
    pub(crate) fn reduce(
        &self,
        loss: &dyn Loss,
        values: &Tensor,
        y_true: &Tensor,
        y_pred: &Tensor,
        sample_weight: Option<&Tensor>,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mask = merged_mask(loss, y_true, y_pred, mask)?;
        let parts = reduce_weighted_parts(values, sample_weight, mask.as_ref(), loss.reduction())?;
        let Some(local) = parts.divisor else {
            return Ok(parts.sum);
        };
        let global = if mask.is_some() {
            let mut divisor = [local];
            self.comm.all_reduce_f64(&mut divisor)?;
            divisor[0]
        } else if let (Reduction::MeanWithSampleWeight, Some(_), Some(sum)) =
            (loss.reduction(), sample_weight, self.global_weight_sum)
        {
            sum
        } else {
            // The number of values: the same per sample on every rank.
            local / self.local_len as f64 * self.global_len as f64
        };
        divide_no_nan(&parts.sum, global)
    }

    /// The terms a loss weighting strategy combines, summed over the ranks: the global batch's
    /// terms, the same on every rank, so that every rank's strategy sees and sets what one
    /// process's does. Their gradient passes to each rank's own terms unchanged
    /// ([`Adjoint::Identity`]): every rank differentiates the same objective of the global
    /// terms, and the step's all-reduce sums the ranks' parts. One all-reduce of one value
    /// per term.
    pub(crate) fn global_terms(&self, terms: &[Tensor]) -> Result<Vec<Tensor>> {
        let scalars = terms
            .iter()
            .map(|t| t.reshape(1))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let packed = Tensor::cat(&scalars, 0)?;
        let global = all_reduce(&packed, &self.comm, Adjoint::Identity)?;
        (0..terms.len()).map(|i| Ok(global.get(i)?)).collect()
    }

    /// Sums each term's gradients (gradient diagnostics) over the ranks, so that their norms
    /// and cosines are those of the global batch's terms: one all-reduce of every term's
    /// gradient (K times the step's gradient for K terms; diagnostics are opt-in).
    pub(crate) fn all_reduce_term_gradients(
        &self,
        terms: &mut [Vec<Option<Tensor>>],
    ) -> Result<()> {
        let mut buffer = Vec::new();
        for g in terms.iter().flat_map(|g| g.iter().flatten()) {
            buffer.extend(g.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?);
        }
        self.comm.all_reduce_f64(&mut buffer)?;
        let mut at = 0;
        for g in terms.iter_mut().flat_map(|g| g.iter_mut().flatten()) {
            let n = g.elem_count();
            let summed = Tensor::from_slice(&buffer[at..at + n], g.dims(), g.device())?;
            *g = summed.to_dtype(g.dtype())?;
            at += n;
        }
        Ok(())
    }

    /// Sums the step's gradients and term values over the ranks with one all-reduce, and gives
    /// every rank rank 0's non-trainable weights (`state`) in the same buffer (the other ranks
    /// add -0.0, which leaves every value, zeros' signs included, as it is).
    pub(crate) fn all_reduce_step(
        &self,
        dtype: DType,
        gradients: Vec<Option<Tensor>>,
        values: Vec<f64>,
        state: &[Weight],
    ) -> Result<(Vec<Option<Tensor>>, Vec<f64>)> {
        let root = self.comm.rank() == 0;
        let grads: Vec<&Tensor> = gradients.iter().flatten().collect();
        let states: Vec<&Tensor> = state.iter().map(|w| w.var.as_tensor()).collect();
        let len = grads
            .iter()
            .chain(&states)
            .map(|t| t.elem_count())
            .sum::<usize>()
            + values.len();
        let within = |e: Error| match e {
            Error::Distributed(m) => Error::Distributed(m),
            other => Error::Distributed(format!(
                "{}: the all-reduce of the gradients failed: {other}",
                rank_name(&*self.comm)
            )),
        };
        let mut pieces: Vec<Tensor> = Vec::with_capacity(grads.len() + states.len());
        let summed: Vec<f64> = if dtype == DType::F64 {
            let mut buffer = Vec::with_capacity(len);
            fill(&mut buffer, &grads, &states, root, &values, |v| v)?;
            self.comm.all_reduce_f64(&mut buffer).map_err(within)?;
            let mut at = 0;
            for t in grads.iter().chain(&states) {
                let n = t.elem_count();
                pieces.push(Tensor::from_slice(
                    &buffer[at..at + n],
                    t.dims(),
                    t.device(),
                )?);
                at += n;
            }
            buffer[at..].to_vec()
        } else {
            let mut buffer = Vec::with_capacity(len);
            fill(&mut buffer, &grads, &states, root, &values, |v| v as f32)?;
            self.comm.all_reduce_f32(&mut buffer).map_err(within)?;
            let mut at = 0;
            for t in grads.iter().chain(&states) {
                let n = t.elem_count();
                let piece = Tensor::from_slice(&buffer[at..at + n], t.dims(), t.device())?;
                pieces.push(piece.to_dtype(t.dtype())?);
                at += n;
            }
            buffer[at..].iter().map(|&v| f64::from(v)).collect()
        };
        let mut pieces = pieces.into_iter();
        let gradients = gradients
            .into_iter()
            .map(|g| g.map(|_| pieces.next().expect("one piece per gradient")))
            .collect();
        for (w, value) in state.iter().zip(pieces) {
            w.var.set(&value)?;
        }
        Ok((gradients, summed))
    }
}

/// Appends the gradients, the states (rank 0's; -0.0 elsewhere) and the values to `buffer`.
fn fill<T: candle_core::WithDType>(
    buffer: &mut Vec<T>,
    grads: &[&Tensor],
    states: &[&Tensor],
    root: bool,
    values: &[f64],
    cast: impl Fn(f64) -> T,
) -> Result<()> {
    for g in grads {
        buffer.extend(g.to_dtype(T::DTYPE)?.flatten_all()?.to_vec1::<T>()?);
    }
    for s in states {
        if root {
            buffer.extend(s.to_dtype(T::DTYPE)?.flatten_all()?.to_vec1::<T>()?);
        } else {
            buffer.extend(std::iter::repeat_n(cast(-0.0), s.elem_count()));
        }
    }
    buffer.extend(values.iter().map(|&v| cast(v)));
    Ok(())
}

/// Checks, before the first step, that the ranks can train together: every global batch has
/// a sample for every rank, and every rank has the same data, weights and settings (their
/// fingerprints are gathered: a rank that differs is named).
pub(crate) fn check_fit(
    comm: &dyn Communicator,
    train: &Dataset,
    weights: &[Weight],
    batch_size: usize,
    settings: &str,
) -> Result<()> {
    let (n, size) = (train.len(), comm.size());
    let last = match n % batch_size {
        0 => batch_size.min(n),
        r => r,
    };
    let smallest = batch_size.min(n).min(last);
    if smallest < size {
        return Err(Error::InvalidArgument(format!(
            "{}: a global batch of {smallest} samples (of {n} in batches of {batch_size}) cannot \
             give each of the {size} ranks a sample: choose a batch_size (and a data size) whose \
             every batch, the epoch's last included, has at least {size} samples",
            rank_name(comm)
        )));
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(settings.as_bytes());
    crc.update(&(n as u64).to_le_bytes());
    let tensors = train
        .inputs()
        .iter()
        .chain(train.targets())
        .chain(train.sample_weight())
        .chain(weights.iter().map(|w| w.var.as_tensor()));
    for t in tensors {
        use safetensors::View;
        crc.update(&t.contiguous()?.data());
    }
    let mine = u64::from(crc.finalize());
    let all = comm.all_gather_u64(mine)?;
    if let Some(r) = all.iter().position(|&f| f != all[0]) {
        return Err(Error::Distributed(format!(
            "rank {r} of {size} starts from other data, weights or settings than rank 0 \
             (fingerprint {:08x}, rank 0: {:08x}): every rank must run the same program on the \
             same data (on a cluster, the same files, on a shared folder)",
            all[r], all[0]
        )));
    }
    Ok(())
}

/// Sums the training metrics' states over the ranks at an epoch's end, so that every rank
/// reports the metrics of all the epoch's samples.
pub(crate) fn merge_metrics(
    comm: &dyn Communicator,
    metrics: &mut [(String, Box<dyn crate::metrics::Metric>)],
) -> Result<()> {
    let mut buffer = Vec::new();
    let mut lens = Vec::with_capacity(metrics.len());
    for (name, m) in metrics.iter() {
        let state = m.state().ok_or_else(|| unsupported_metric(name))?;
        lens.push(state.len());
        buffer.extend(state);
    }
    if buffer.is_empty() {
        return Ok(());
    }
    comm.all_reduce_f64(&mut buffer)?;
    let mut at = 0;
    for ((name, m), n) in metrics.iter_mut().zip(lens) {
        m.set_state(&buffer[at..at + n])
            .map_err(|e| e.within(format!("metric `{name}`")))?;
        at += n;
    }
    Ok(())
}

pub(crate) fn unsupported_metric(name: &str) -> Error {
    Error::InvalidArgument(format!(
        "metric `{name}` cannot be summed across ranks (its Metric::state is None): \
         implement Metric::state and Metric::set_state for it, or train on one process"
    ))
}
