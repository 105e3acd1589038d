//! Training and evaluation: the total-loss rule, one step, epochs, progress and logs.

use super::compile::{not_compiled, Compiled};
use super::history::Accumulator;
use super::progress::EpochProgress;
use super::{ForwardPass, History, Logs, Model, Tensors};
use crate::adversarial::Adversarial;
use crate::callbacks::{Callback, Control};
use crate::data::Dataset;
use crate::distributed::{SharedCommunicator, StepShard};
use crate::error::{Error, Result};
use crate::gradients::Gradients;
use crate::losses::reduce_per_sample;
use crate::random::StepRandom;
use candle_core::{Tensor, Var};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::sync::{Arc, Mutex};

/// How `fit` trains: epochs, batch size, shuffling, validation, class weights, verbosity.
///
/// ```
/// let fit = kiln::Fit::new().epochs(10).batch_size(64).validation_split(0.1).seed(7).quiet();
/// ```
#[derive(Clone)]
pub struct Fit {
    epochs: usize,
    batch_size: usize,
    shuffle: bool,
    seed: u64,
    validation_split: f64,
    validation_data: Option<Dataset>,
    class_weight: Option<Vec<(usize, f64)>>,
    verbose: bool,
    initial_epoch: usize,
    gradient_accumulation_steps: usize,
    gradient_diagnostics: bool,
    validation_gradient_diagnostics: bool,
    callbacks: Vec<SharedCallback>,
    callback_states: Vec<Option<serde_json::Value>>,
    callback_tensors: Vec<Vec<(String, Tensor)>>,
    distributed: Option<SharedCommunicator>,
}

/// A callback as `Fit` holds it: shared, so a `Fit` can be cloned and the caller can keep a
/// handle to read the callback's state afterwards.
pub type SharedCallback = Arc<Mutex<dyn Callback>>;

impl Default for Fit {
    fn default() -> Self {
        Self::new()
    }
}

impl Fit {
    /// One epoch, batches of 32, shuffled with seed 0, no validation, progress shown.
    pub fn new() -> Self {
        Self {
            epochs: 1,
            batch_size: 32,
            shuffle: true,
            seed: 0,
            validation_split: 0.0,
            validation_data: None,
            class_weight: None,
            verbose: true,
            initial_epoch: 0,
            gradient_accumulation_steps: 1,
            gradient_diagnostics: false,
            validation_gradient_diagnostics: false,
            callbacks: Vec::new(),
            callback_states: Vec::new(),
            callback_tensors: Vec::new(),
            distributed: None,
        }
    }
    /// The callbacks' states saved in a checkpoint (`Checkpoint::callback_states`), restored
    /// when training begins, so that a resumed run's callbacks continue where they stopped.
    pub fn callback_states(mut self, states: Vec<Option<serde_json::Value>>) -> Self {
        self.callback_states = states;
        self
    }
    /// The callbacks' tensors saved in a checkpoint (`Checkpoint::callback_tensors`, such as
    /// early stopping's best weights), restored with [`Fit::callback_states`].
    pub fn callback_tensor_states(mut self, tensors: Vec<Vec<(String, Tensor)>>) -> Self {
        self.callback_tensors = tensors;
        self
    }
    /// Adds a callback (early stopping, checkpoints, schedules, …).
    pub fn callback(mut self, callback: impl Callback + 'static) -> Self {
        self.callbacks.push(Arc::new(Mutex::new(callback)));
        self
    }
    /// Adds a callback the caller keeps a handle to.
    pub fn shared_callback(mut self, callback: SharedCallback) -> Self {
        self.callbacks.push(callback);
        self
    }
    /// The epoch to start from (for resumed runs): epochs before it are skipped, and every
    /// epoch's shuffling and dropout depend only on the seed and the epoch number, so a resumed
    /// run continues exactly as an uninterrupted one.
    pub fn initial_epoch(mut self, epoch: usize) -> Self {
        self.initial_epoch = epoch;
        self
    }
    /// The number of epochs this will train to.
    pub(crate) fn planned_epochs(&self) -> usize {
        self.epochs
    }
    /// The number of passes over the data.
    pub fn epochs(mut self, epochs: usize) -> Self {
        self.epochs = epochs;
        self
    }
    /// Samples per step.
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }
    /// Whether to shuffle the training samples every epoch.
    pub fn shuffle(mut self, shuffle: bool) -> Self {
        self.shuffle = shuffle;
        self
    }
    /// The seed for shuffling and for every draw of a training step (dropout masks, PGD's
    /// random start), which are keyed by the seed and the step ([`crate::random`]): the same
    /// seed and data give the same history, on any number of ranks.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Holds out the last `fraction` of the samples (before shuffling) for validation.
    pub fn validation_split(mut self, fraction: f64) -> Self {
        self.validation_split = fraction;
        self
    }
    /// Validates on this data after every epoch (overrides `validation_split`).
    pub fn validation_data(mut self, data: Dataset) -> Self {
        self.validation_data = Some(data);
        self
    }
    /// Weights each sample by the weight of its class (single-output models).
    pub fn class_weight(mut self, weights: Vec<(usize, f64)>) -> Self {
        self.class_weight = Some(weights);
        self
    }
    /// Shows (or hides) the progress bar and the per-epoch line.
    pub fn verbose(mut self, verbose: bool) -> Self {
        self.verbose = verbose;
        self
    }
    /// Hides all progress output.
    pub fn quiet(self) -> Self {
        self.verbose(false)
    }
    /// Updates the weights once every `steps` batches (Keras' `gradient_accumulation_steps`),
    /// with the gradient one batch of all their samples would give: each batch's gradient is
    /// weighted by its share of the group's samples, so the data terms are the group's mean and
    /// the added terms (regularizers) count once per update. An epoch's last group may be
    /// shorter; it is applied at the epoch's end as the update of its own samples (Keras instead
    /// carries it into the next epoch). Default 1: an update every batch.
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// use kiln::prelude::*;
    /// let train = |batch_size: usize, accumulate: usize| -> kiln::Result<Vec<f32>> {
    ///     let x = Input::new([1]);
    ///     let y = Dense::new(1).use_bias(false).kernel_initializer(Initializer::Ones).apply(&x)?;
    ///     let mut model = Model::new(&[x], &[y])?;
    ///     model.compile(Compile::new(Sgd::new(0.1)).loss("mse"))?;
    ///     let xs = Tensor::new(&[[1f32], [2.], [3.], [4.]], &Device::Cpu)?;
    ///     let fit = Fit::new().batch_size(batch_size).shuffle(false).quiet();
    ///     model.fit(&Dataset::new(xs.clone(), xs.zeros_like()?)?, fit.gradient_accumulation_steps(accumulate))?;
    ///     Ok(model.weight("dense/kernel")?.var.as_tensor().flatten_all()?.to_vec1()?)
    /// };
    /// let (big, accumulated) = (train(4, 1)?, train(1, 4)?);
    /// assert!((big[0] - accumulated[0]).abs() < 1e-6); // 1 - 0.1·2·7.5 = -0.5
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn gradient_accumulation_steps(mut self, steps: usize) -> Self {
        self.gradient_accumulation_steps = steps;
        self
    }
    /// Trains data-parallel with the other ranks of `communicator` (MPI, or a
    /// [`LocalGroup`](crate::distributed::LocalGroup)); see [`crate::distributed`]. Every rank
    /// calls `fit` with the same model, data and `Fit`; `batch_size` is the global batch, of
    /// which each rank trains its shard, and every rank ends with the same weights. Only rank
    /// 0 shows progress. With one rank this is the single-process `fit`, bit for bit.
    ///
    /// ```
    /// use kiln::distributed::LocalGroup;
    /// use kiln::prelude::*;
    /// let train = |fit: Fit| -> kiln::Result<Vec<f32>> {
    ///     let x = Input::new([1]);
    ///     let y = Dense::new(1).use_bias(false).kernel_initializer(Initializer::Ones).apply(&x)?;
    ///     let mut model = Model::new(&[x], &[y])?;
    ///     model.compile(Compile::new(Sgd::new(0.1)).loss("mse"))?;
    ///     let xs = Tensor::new(&[[1f32], [2.], [3.], [4.]], &Device::Cpu)?;
    ///     model.fit(&Dataset::new(xs.clone(), xs.zeros_like()?)?, fit.batch_size(4).quiet())?;
    ///     Ok(model.weight("dense/kernel")?.var.as_tensor().flatten_all()?.to_vec1()?)
    /// };
    /// let alone = train(Fit::new())?;
    /// let ranks: Vec<Vec<f32>> = std::thread::scope(|s| {
    ///     let runs: Vec<_> = LocalGroup::new(2).into_iter()
    ///         .map(|rank| s.spawn(move || train(Fit::new().distributed(std::sync::Arc::new(rank)))))
    ///         .collect();
    ///     runs.into_iter().map(|r| r.join().unwrap()).collect::<kiln::Result<_>>()
    /// })?;
    /// assert_eq!(ranks, vec![alone.clone(), alone]); // 1 - 0.1·2·7.5 = -0.5 on both ranks
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn distributed(mut self, communicator: SharedCommunicator) -> Self {
        self.distributed = Some(communicator);
        self
    }
    /// Records per-term gradient diagnostics (off by default): for each term of the total
    /// (each output's weighted loss, each added term, the adversarial term), the L2 norm of
    /// its gradient over the shared trainable weights, `grad_norm/<term>`, and the cosine
    /// between every pair of terms' gradients, `grad_cos/<a>/<b>`, averaged over the
    /// epoch's training batches (see [`Model::term_gradients`] for which weights are shared).
    ///
    /// Cost: one more backward pass per term on every training step (no extra forward pass),
    /// only when on; measured in bench/README.md (`kiln-bench --workloads D1`: 2.1×, 2.9× and
    /// 3.8× the step time with 2, 3 and 5 terms on a 784-512-512 trunk, as the passes predict).
    /// What is learned does not change: the update still uses the total's own gradient, so
    /// the weights are bit-identical with diagnostics on or off.
    ///
    /// Under a loss weighting strategy the norms and cosines are of the terms as compiled
    /// (an output's loss times its fixed `loss_weight`), *before* the strategy's weights: they
    /// say how the terms themselves pull, which is what a strategy reacts to, and a weighted
    /// norm is one product away (`loss_weight/<term>` · `grad_norm/<term>`), while PCGrad's
    /// projected gradients are not a weighting of the terms at all. Cosines do not change
    /// under positive weights either way.
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// use kiln::prelude::*;
    /// let x = Input::new([1]);
    /// let y = Dense::new(1).use_bias(false).kernel_initializer(Initializer::Ones)
    ///     .kernel_regularizer(L2::new(0.5)).apply(&x)?;
    /// let mut model = Model::new(&[x], &[y])?;
    /// model.compile(Compile::new(Sgd::new(0.0)).loss("mse"))?;
    /// let data = Dataset::new(Tensor::new(&[[2f32]], &Device::Cpu)?, Tensor::new(&[[0f32]], &Device::Cpu)?)?;
    /// let history = model.fit(&data, Fit::new().quiet().gradient_diagnostics(true))?;
    /// // d/dw of the mse (2w)² is 8w = 8, of the penalty 0.5·w² is w = 1: the same direction.
    /// assert_eq!(history.get("grad_norm/dense_loss"), Some(vec![8.0]));
    /// assert_eq!(history.get("grad_norm/l2"), Some(vec![1.0]));
    /// assert_eq!(history.get("grad_cos/dense_loss/l2"), Some(vec![1.0]));
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn gradient_diagnostics(mut self, on: bool) -> Self {
        self.gradient_diagnostics = on;
        self
    }
    /// Records the same diagnostics on the validation data (off by default), as
    /// `val_grad_norm/<term>` and `val_grad_cos/<a>/<b>`: each validation batch's terms, as
    /// they are evaluated (inference mode: no dropout, BatchNormalization on its moving
    /// statistics, the adversarial term on the batch attacked in that mode), differentiated
    /// one by one over the shared trainable weights, weighted by batch size over the epoch.
    /// Held-out gradients say whether the terms still pull together on data the model does
    /// not fit to. Independent of [`Fit::gradient_diagnostics`].
    ///
    /// Cost: one forward pass with its graph kept and one backward pass per term on every
    /// validation batch, only when on; training is unchanged.
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// use kiln::prelude::*;
    /// let x = Input::new([1]);
    /// let y = Dense::new(1).use_bias(false).kernel_initializer(Initializer::Ones)
    ///     .kernel_regularizer(L2::new(0.5)).apply(&x)?;
    /// let mut model = Model::new(&[x], &[y])?;
    /// model.compile(Compile::new(Sgd::new(0.0)).loss("mse"))?;
    /// let d = Device::Cpu;
    /// let train = Dataset::new(Tensor::new(&[[2f32]], &d)?, Tensor::new(&[[0f32]], &d)?)?;
    /// let held_out = Dataset::new(Tensor::new(&[[1f32]], &d)?, Tensor::new(&[[3f32]], &d)?)?;
    /// let fit = Fit::new().quiet().validation_data(held_out).validation_gradient_diagnostics(true);
    /// let history = model.fit(&train, fit)?;
    /// // d/dw of the mse (w·1 − 3)² is 2(w − 3) = −4, of the penalty 0.5·w² is w = 1: opposed.
    /// assert_eq!(history.get("val_grad_norm/dense_loss"), Some(vec![4.0]));
    /// assert_eq!(history.get("val_grad_norm/l2"), Some(vec![1.0]));
    /// assert_eq!(history.get("val_grad_cos/dense_loss/l2"), Some(vec![-1.0]));
    /// assert_eq!(history.get("grad_norm/l2"), None); // training diagnostics are off
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn validation_gradient_diagnostics(mut self, on: bool) -> Self {
        self.validation_gradient_diagnostics = on;
        self
    }
}

/// Where a batch stands in its gradient-accumulation group: its gradient's weight (its share
/// of the group's samples) and whether it completes the group (the update is applied).
#[derive(Clone, Copy)]
struct Group {
    scale: f64,
    last: bool,
}

impl Group {
    /// A batch that is its own group: the ordinary step.
    const WHOLE: Group = Group {
        scale: 1.0,
        last: true,
    };

    /// The place of batch `b` among batches of `sizes`, grouped `steps` at a time.
    fn of(b: usize, sizes: &[usize], steps: usize) -> Group {
        let start = b / steps * steps;
        let end = (start + steps).min(sizes.len());
        let samples: usize = sizes[start..end].iter().sum();
        Group {
            scale: sizes[b] as f64 / samples as f64,
            last: b + 1 == end,
        }
    }
}

/// The compiled part of a step's loss: Σ loss_weight · reduced loss, and each output's value.
pub(super) struct LabeledLoss {
    pub(super) total: Option<Tensor>,
    per_output: Vec<(String, Tensor)>,
    /// Each output's term as it enters the total (loss_weight · reduced), graph kept.
    weighted: Vec<Tensor>,
}

/// A training step's passes before its update, from [`Model::step_gradients`].
pub(super) struct StepGradients {
    pub(super) terms: StepTerms,
    pub(super) pass: ForwardPass,
    /// The trainable weights, in [`Model::weights`] order.
    pub(super) trainable: Vec<Var>,
    /// The gradient of the total over each of `trainable` (`None`: it does not depend on it).
    pub(super) gradients: Vec<Option<Tensor>>,
}

/// The terms of one step: the total to differentiate and each reported term.
pub(super) struct StepTerms {
    pub(super) total: Tensor,
    pub(super) reported: Vec<(String, Tensor)>,
    /// Σ loss_weight · reduced compile-time loss (what an adversarial attack differentiates).
    labeled: Option<Tensor>,
    /// Σ added terms, if any.
    added: Option<Tensor>,
    /// With a loss weighting strategy: the terms it weighs (with their graphs), and the total
    /// to report (Σ weight · term + the rest), which differs from the objective.
    weighed: Vec<Tensor>,
    shown: Option<Tensor>,
    /// Each term as it enters the total, graph kept, under the name the history reports it
    /// by (`loss` when the total has one part); the adversarial term is pushed by the step.
    pub(super) parts: Vec<(String, Tensor)>,
}

impl StepTerms {
    /// The total as the logs report it.
    fn shown(&self) -> &Tensor {
        self.shown.as_ref().unwrap_or(&self.total)
    }

    /// Adds a term computed after the backward pass (the adversarial one) to the reported
    /// totals and the breakdown.
    pub(super) fn push_detached(&mut self, name: String, term: Tensor) -> Result<()> {
        self.total = (self.total.detach() + &term)?;
        if let Some(shown) = self.shown.take() {
            self.shown = Some((shown + &term)?);
        }
        self.reported.push((name, term));
        Ok(())
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

impl Model {
    /// Σ loss_weight · reduced compile-time loss over the outputs, and each output's reduced
    /// value under its log name (the "labeled loss" adversarial attacks differentiate).
    pub(super) fn compiled_loss(
        &self,
        compiled: &Compiled,
        batch: &Dataset,
        pass: &ForwardPass,
    ) -> Result<LabeledLoss> {
        let outputs = self.outputs_of(pass);
        let masks = self.output_masks(pass);
        let batch_size = batch.len();
        let mut total: Option<Tensor> = None;
        let mut reported = Vec::new();
        let mut weighted_terms = Vec::new();
        for ol in &compiled.losses {
            let name = &self.output_names[ol.output];
            let y_true = batch.targets.get(ol.output).ok_or_else(|| {
                Error::Data(format!(
                    "output `{name}` has a loss but the data has no target for it"
                ))
            })?;
            // Keras 2's rule: the crossentropy of the logits behind the final activation.
            let logits = match &ol.on_logits {
                Some(_) => Some(self.output_logits(pass, ol.output)?),
                None => None,
            };
            let (loss, y_pred) = match (&ol.on_logits, &logits) {
                (Some(twin), Some(z)) => (twin.as_ref(), z),
                _ => (ol.loss.as_ref(), outputs[ol.output]),
            };
            let site = super::contract::LossSite {
                loss,
                output: name,
                y_true,
                y_pred,
            };
            let values = loss
                .per_sample(y_true, y_pred)
                .map_err(|e| site.explain(e))?;
            site.check_shape(&values)?;
            // Once per loss, on the first batch of two samples or more.
            if !ol.probed.load(std::sync::atomic::Ordering::Relaxed) && batch_size > 1 {
                site.check_samples_apart(&values)
                    .map_err(|e| site.explain(e))?;
                ol.probed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            let reduced = match &self.shard {
                None => reduce_per_sample(
                    loss,
                    &values,
                    y_true,
                    y_pred,
                    batch.sample_weight_for(ol.output),
                    masks[ol.output],
                ),
                Some(shard) => shard.reduce(
                    loss,
                    &values,
                    y_true,
                    y_pred,
                    batch.sample_weight_for(ol.output),
                    masks[ol.output],
                ),
            }
            .map_err(|e| site.explain(e))?;
            let weighted = (&reduced * ol.weight)?;
            total = Some(match total.take() {
                Some(acc) => (acc + &weighted)?,
                None => weighted.clone(),
            });
            weighted_terms.push(weighted);
            reported.push((ol.log_name.clone(), reduced));
        }
        Ok(LabeledLoss {
            total,
            per_output: reported,
            weighted: weighted_terms,
        })
    }

    /// Computes the total loss of a batch: Σ loss_weight · reduced compile-time loss over the
    /// outputs, plus every added term (regularizers, layer-added losses, `add_loss` closures).
    /// The adversarial term is left to the caller, which needs the input gradient; `adversarial`
    /// says whether it will be added.
    ///
    /// Each compile-time loss is reported as `<output>_loss` whenever the total has more than
    /// one part, so that the data term is never hidden inside `loss`.
    ///
    /// With a loss weighting strategy, the weighed terms are combined by it: `advance` (a
    /// training step of `fit`) lets it set this step's weights; otherwise its current weights
    /// apply.
    pub(super) fn step_terms(
        &self,
        compiled: &Compiled,
        batch: &Dataset,
        pass: &ForwardPass,
        training: bool,
        adversarial: bool,
        advance: bool,
    ) -> Result<StepTerms> {
        let LabeledLoss {
            total: labeled,
            per_output,
            weighted,
        } = self.compiled_loss(compiled, batch, pass)?;
        let mut added_total: Option<Tensor> = None;
        let mut add = |t: Tensor| -> Result<()> {
            added_total = Some(match added_total.take() {
                Some(acc) => (acc + t)?,
                None => t,
            });
            Ok(())
        };
        let mut added: Vec<(String, Tensor)> = Vec::new();
        let mut accumulate = |name: String, value: Tensor| -> Result<()> {
            let value = value.sum_all()?;
            match added.iter_mut().find(|(n, _)| *n == name) {
                Some(slot) => slot.1 = (&slot.1 + value)?,
                None => added.push((name, value)),
            }
            Ok(())
        };
        for w in self.weights() {
            if let (true, Some(reg)) = (w.trainable(), &w.regularizer) {
                let value = reg
                    .penalty(w.var.as_tensor())
                    .map_err(|e| e.within(format!("regularizer of weight `{}`", w.name)))?;
                accumulate(reg.name().to_string(), value)?;
            }
        }
        for (name, value) in &pass.layer_losses {
            accumulate(name.clone(), value.clone())?;
        }
        let tensors = Tensors {
            model: self,
            pass,
            inputs: &batch.inputs,
            targets: &batch.targets,
            training,
            within: None,
        };
        for (name, loss) in self.added.iter().filter(|(_, l)| l.adversarial().is_none()) {
            let value = loss
                .compute(&tensors)
                .map_err(|e| e.within(format!("added loss `{name}`")))?;
            // Keras sums a non-scalar term; kiln refuses it, since a per-sample term summed
            // grows with the batch size.
            if value.elem_count() != 1 {
                return Err(Error::AddedLossShape {
                    term: name.clone(),
                    shape: value.dims().to_vec(),
                });
            }
            accumulate(name.clone(), value.to_dtype(self.dtype)?)?;
        }
        // A rank's added terms count by its share of the global batch (see `distributed`).
        let added = match &self.shard {
            Some(shard) => added
                .into_iter()
                .map(|(name, value)| Ok((name, (value * shard.share())?)))
                .collect::<Result<Vec<_>>>()?,
            None => added,
        };
        let outputs = per_output.len();
        let count = outputs + added.len() + usize::from(adversarial);
        let mut parts: Vec<(String, Tensor)> = per_output
            .iter()
            .zip(weighted.iter().cloned())
            .map(|((name, _), w)| (name.clone(), w))
            .collect();
        let mut reported = if count > 1 { per_output } else { Vec::new() };
        let weighs_added = compiled
            .weighting
            .as_ref()
            .is_some_and(|w| w.terms.len() > w.outputs);
        for (name, value) in added.iter().cloned() {
            // Terms the strategy weighs are summed by it, not here.
            if !weighs_added {
                add(value.clone())?;
            }
            parts.push((name.clone(), value.clone()));
            reported.push((name, value));
        }
        // A lone output loss is reported as `loss` alone (a lone added term keeps its name).
        if let ([only], 1, 1) = (parts.as_mut_slice(), count, outputs) {
            only.0 = "loss".to_string();
        }
        let (labeled, weighed, shown) = match &compiled.weighting {
            None => (labeled, Vec::new(), None),
            Some(w) => {
                let mut weighed = weighted;
                if weighs_added {
                    weighed.extend(self.added_in_order(&w.terms[w.outputs..], &added)?);
                }
                // A rank's strategy combines the global batch's terms (see `distributed`).
                let seen = match &self.shard {
                    Some(shard) => shard.global_terms(&weighed)?,
                    None => weighed.clone(),
                };
                let mut strategy = w.lock();
                let objective = match advance {
                    true => strategy.combine(&seen)?,
                    false => crate::loss_weighting::weighted_sum(&seen, &strategy.weights()?)?,
                };
                // The reported total is this rank's part, summed over the ranks for the logs.
                let values: Vec<Tensor> = weighed.iter().map(Tensor::detach).collect();
                let mut shown = crate::loss_weighting::weighted_sum(&values, &strategy.weights()?)?;
                if let Some(a) = &added_total {
                    shown = (shown + a.detach())?;
                }
                (Some(objective), seen, Some(shown))
            }
        };
        let total = match (&labeled, &added_total) {
            (Some(l), Some(a)) => (l + a)?,
            (Some(t), None) | (None, Some(t)) => t.clone(),
            (None, None) => Tensor::zeros((), self.dtype, &self.device)?,
        };
        Ok(StepTerms {
            total,
            reported,
            labeled,
            added: added_total,
            weighed,
            shown,
            parts,
        })
    }

    /// The added terms a strategy weighs, in its order: a term absent from this step (a
    /// regularizer of a frozen weight) is 0; one it does not know is an error.
    fn added_in_order(&self, names: &[String], added: &[(String, Tensor)]) -> Result<Vec<Tensor>> {
        if let Some((unknown, _)) = added.iter().find(|(n, _)| !names.contains(n)) {
            return Err(Error::Compile(format!(
                "added term `{unknown}` appeared while training, but the loss weighting \
                 strategy weighs {names:?} (the terms known at compile): add every term before \
                 compile"
            )));
        }
        names
            .iter()
            .map(|name| match added.iter().find(|(n, _)| n == name) {
                Some((_, v)) => Ok(v.reshape(())?),
                None => Ok(Tensor::zeros((), self.dtype, &self.device)?),
            })
            .collect()
    }

    /// Adds a batch's terms and metrics to the running epoch means.
    pub(super) fn record(
        &self,
        compiled: &Compiled,
        acc: &mut Accumulator,
        terms: &StepTerms,
        batch: &Dataset,
        pass: &ForwardPass,
    ) -> Result<()> {
        // A rank's step records the global batch's values, summed by `finish_step`.
        let n = self
            .shard
            .as_ref()
            .map_or(batch.len(), StepShard::global_len) as f64;
        acc.add("loss", scalar(terms.shown())? * n, n);
        for (name, value) in &terms.reported {
            acc.add(name, scalar(value)? * n, n);
        }
        let outputs = self.outputs_of(pass);
        let masks = self.output_masks(pass);
        for m in &compiled.metrics {
            let (Some(y_true), y_pred) = (batch.targets.get(m.output), outputs[m.output]) else {
                continue;
            };
            // As Keras: sample (and class) weights reach the weighted metrics only; a mask
            // (padding) leaves its entries out of every metric, as weight 0.
            let weight = crate::metrics::metric_weights(
                m.weighted
                    .then(|| batch.sample_weight_for(m.output))
                    .flatten(),
                masks[m.output],
            )?;
            acc.metric(&m.log_name, m.metric.as_ref())
                .update(y_true, &y_pred.detach(), weight.as_ref())
                .map_err(|e| {
                    let e = match e {
                        Error::Data(msg) | Error::InvalidArgument(msg) => msg,
                        other => other.to_string(),
                    };
                    Error::Data(format!(
                        "metric `{}` for output `{}` failed on y_true {:?} and y_pred {:?}: {e}",
                        m.metric.name(),
                        self.output_names[m.output],
                        y_true.dims(),
                        y_pred.dims()
                    ))
                })?;
        }
        Ok(())
    }

    /// The adversarial added term, if the model has one.
    pub(super) fn adversarial_term(&self) -> Option<(String, Adversarial)> {
        self.added
            .iter()
            .find_map(|(n, l)| l.adversarial().map(|a| (n.clone(), a.clone())))
    }

    /// The gradient of the compiled ("labeled") loss with respect to each input, at `inputs`.
    fn labeled_input_gradient(
        &self,
        compiled: &Compiled,
        batch: &Dataset,
        inputs: &[Tensor],
        training: bool,
        random: &mut StepRandom,
    ) -> Result<Vec<Tensor>> {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|x| Var::from_tensor(&x.to_dtype(self.dtype)?.detach()).map_err(Error::from))
            .collect::<Result<_>>()?;
        let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let pass = self.run(&xs, training, random)?;
        let labeled = self
            .compiled_loss(compiled, batch, &pass)?
            .total
            .ok_or_else(no_labeled_loss)?;
        let grads = crate::gradients::backward_for_inputs(&labeled)?;
        vars.iter()
            .map(|v| match grads.get(v.as_tensor()) {
                Some(g) => Ok(g.clone()),
                None => Ok(v.as_tensor().zeros_like()?),
            })
            .collect()
    }

    /// The perturbed inputs of an attack. `first` is the input gradient at the clean batch when
    /// the caller already has it (the clean backward pass of a training step).
    pub(super) fn attack(
        &self,
        compiled: &Compiled,
        adversarial: &Adversarial,
        batch: &Dataset,
        first: Option<Vec<Tensor>>,
        training: bool,
        random: &mut StepRandom,
    ) -> Result<Vec<Tensor>> {
        let clean: Vec<Tensor> = batch
            .inputs
            .iter()
            .map(|x| Ok(x.to_dtype(self.dtype)?.detach()))
            .collect::<Result<_>>()?;
        let first_row = self.shard.as_ref().map_or(0, |s| s.first_row());
        let start = random.next_pass().streams(
            "adversarial random start",
            adversarial.random_start_seed() as usize,
            first_row,
        );
        let mut current = adversarial.start(&clean, &start)?;
        let mut first = if adversarial.random_start_enabled() {
            None
        } else {
            first
        };
        for _ in 0..adversarial.steps() {
            let grads = match first.take() {
                Some(g) => g,
                None => self.labeled_input_gradient(compiled, batch, &current, training, random)?,
            };
            current = adversarial.step_along(&clean, &current, &grads)?;
        }
        Ok(current)
    }

    /// One training step on a batch: forward, total loss, backward, optimizer update. With an
    /// adversarial term: the clean backward pass also gives the input gradient, then one more
    /// forward and backward pass on the perturbed batch.
    fn train_step(
        &mut self,
        batch: &Dataset,
        random: &mut StepRandom,
        acc: &mut Accumulator,
        group: Group,
        diagnostics: bool,
    ) -> Result<f64> {
        let mut choice = std::mem::take(&mut self.thread_choice);
        let in_process = self.shard.as_ref().is_some_and(StepShard::in_process);
        let result = match self.device.is_cpu() {
            true if in_process => crate::runtime::on_calling_thread(|| {
                self.train_step_here(batch, random, acc, group, diagnostics)
            }),
            true => choice.run(batch.len(), || {
                self.train_step_here(batch, random, acc, group, diagnostics)
            }),
            false => crate::runtime::on_matmul_pool(|| {
                self.train_step_here(batch, random, acc, group, diagnostics)
            }),
        };
        self.thread_choice = choice;
        result
    }

    /// [`Self::train_step`] on the calling thread.
    fn train_step_here(
        &mut self,
        batch: &Dataset,
        random: &mut StepRandom,
        acc: &mut Accumulator,
        group: Group,
        diagnostics: bool,
    ) -> Result<f64> {
        let mut compiled = self.compiled.take().ok_or_else(not_compiled)?;
        let result = (|| -> Result<f64> {
            let step = self.step_gradients(&compiled, batch, random, true)?;
            if diagnostics {
                self.record_term_diagnostics(acc, &step.terms, &step.trainable, batch.len())?;
            }
            let StepGradients {
                terms,
                pass,
                trainable,
                gradients,
            } = step;
            self.finish_step(
                &mut compiled,
                acc,
                &terms,
                batch,
                &pass,
                trainable,
                gradients,
                group,
            )
        })();
        self.compiled = Some(compiled);
        result
    }

    /// Gradient diagnostics of one batch's `terms` (each with its graph) over `trainable`, into
    /// `acc`, weighted by the batch's `samples`; inside a data-parallel step, of the global
    /// batch (see `distributed`).
    fn record_term_diagnostics(
        &self,
        acc: &mut Accumulator,
        terms: &StepTerms,
        trainable: &[Var],
        samples: usize,
    ) -> Result<()> {
        let shard = self.shard.as_ref();
        let parts = &terms.parts;
        let gradients =
            super::term_gradients::per_term(parts.iter().map(|(_, t)| t), trainable, shard)?;
        let samples = shard.map_or(samples, StepShard::global_len);
        let names: Vec<&str> = parts.iter().map(|(n, _)| n.as_str()).collect();
        super::term_gradients::record_diagnostics(acc, &names, &gradients, samples as f64)
    }

    /// The forward and backward passes of a training step, before any update: the step's
    /// terms (each with its graph, in `parts`) and the gradient of the total over every
    /// trainable weight. With an adversarial term: the clean backward pass also gives the
    /// input gradient, then one more forward and backward pass on the perturbed batch.
    pub(super) fn step_gradients(
        &self,
        compiled: &Compiled,
        batch: &Dataset,
        random: &mut StepRandom,
        advance: bool,
    ) -> Result<StepGradients> {
        let adversarial = self.adversarial_term();
        let input_vars: Vec<Var> = match adversarial {
            Some(_) => batch
                .inputs
                .iter()
                .map(|x| Var::from_tensor(&x.to_dtype(self.dtype)?).map_err(Error::from))
                .collect::<Result<_>>()?,
            None => Vec::new(),
        };
        let inputs: Vec<Tensor> = match adversarial {
            Some(_) => input_vars.iter().map(|v| v.as_tensor().clone()).collect(),
            None => batch.inputs.clone(),
        };
        let pass = self.run(&inputs, true, random)?;
        let mut terms =
            self.step_terms(compiled, batch, &pass, true, adversarial.is_some(), advance)?;
        let mut trainable: Vec<Var> = self
            .weights()
            .into_iter()
            .filter(|w| w.trainable())
            .map(|w| w.var)
            .collect();
        // A strategy's own variables (uncertainty's log-variances) train with the weights.
        if let Some(w) = &compiled.weighting {
            trainable.extend(w.variables.iter().map(|(_, v)| v.clone()));
        }
        let combining = compiled
            .weighting
            .as_ref()
            .filter(|w| w.lock().combines_gradients());
        if let (Some(w), Some(_)) = (combining, &self.shard) {
            return Err(Error::InvalidArgument(format!(
                "loss weighting `{}` combines each batch's per-term gradients, which \
                 data-parallel training does not gather yet: train on one process, or use \
                 uncertainty, dwa or famo",
                w.lock().name()
            )));
        }
        let Some((name, adversarial)) = adversarial else {
            let gradients = match combining {
                None => {
                    let mut grads = Gradients::default();
                    grads.backward(&terms.total)?;
                    grads.take_each(&trainable)?
                }
                Some(w) => {
                    let rest = match w.terms.len() > w.outputs {
                        true => None,
                        false => terms.added.clone(),
                    };
                    self.combined_gradients(w, &terms, rest.as_ref(), &trainable, random, advance)?
                }
            };
            return Ok(StepGradients {
                terms,
                pass,
                trainable,
                gradients,
            });
        };
        // First backward: the compiled ("labeled") loss on the clean batch gives the input
        // gradient that defines the attack (as Neural Structured Learning) and those terms'
        // parameter gradients.
        let labeled = terms.labeled.clone().ok_or_else(no_labeled_loss)?;
        let mut grads = Gradients::default();
        grads.backward(&labeled)?;
        let input_grads: Vec<Tensor> = input_vars
            .iter()
            .map(|v| match grads.take(v.as_tensor())? {
                Some(g) => Ok(g),
                None => Ok(v.as_tensor().zeros_like()?),
            })
            .collect::<Result<_>>()?;
        let x_adv = self.attack(
            compiled,
            &adversarial,
            batch,
            Some(input_grads),
            true,
            random,
        )?;
        let adv_pass = self.run(&x_adv, true, random)?;
        let adv_labeled = self.compiled_loss(compiled, batch, &adv_pass)?.total;
        let term = (adv_labeled.ok_or_else(no_labeled_loss)? * adversarial.weight())?;
        // Second backward: the adversarial term together with the clean batch's added terms
        // (regularizers, layer and closure terms), whose graph is still alive.
        let second = match &terms.added {
            Some(added) => (&term + added)?,
            None => term.clone(),
        };
        let gradients = match combining {
            None => {
                grads.backward(&second)?;
                grads.take_each(&trainable)?
            }
            // (compile refuses weighing added terms beside an adversarial one, so the rest
            // is the adversarial term and the added terms.)
            Some(w) => {
                self.combined_gradients(w, &terms, Some(&second), &trainable, random, advance)?
            }
        };
        terms.push_detached(name.clone(), term.detach())?;
        terms.parts.push((name, term));
        Ok(StepGradients {
            terms,
            pass,
            trainable,
            gradients,
        })
    }

    /// The step's gradient under a strategy that combines the weighed terms' gradients
    /// (PCGrad, GradNorm): one backward pass per weighed term, the strategy's combination,
    /// plus the gradient of `rest` (the terms it does not weigh), one more backward pass.
    fn combined_gradients(
        &self,
        w: &super::compile::Weighting,
        terms: &StepTerms,
        rest: Option<&Tensor>,
        trainable: &[Var],
        random: &mut StepRandom,
        advance: bool,
    ) -> Result<Vec<Option<Tensor>>> {
        // (No shard: data-parallel training refuses a combining strategy, `step_gradients`.)
        let per_term = super::term_gradients::per_term(&terms.weighed, trainable, None)?;
        let values: Vec<f64> = terms.weighed.iter().map(scalar).collect::<Result<_>>()?;
        let mut names: Vec<String> = self
            .weights()
            .into_iter()
            .filter(|x| x.trainable())
            .map(|x| x.name)
            .collect();
        names.extend(w.variables.iter().map(|(n, _)| n.clone()));
        let step = crate::loss_weighting::GradientStep {
            weights: &names,
            values: &values,
            gradients: &per_term,
            seed: random.step_seed(),
        };
        let mut combined = w.lock().combine_gradients(&step, advance)?;
        if let Some(rest) = rest {
            let mut grads = Gradients::default();
            grads.backward(rest)?;
            for (c, r) in combined.iter_mut().zip(grads.take_each(trainable)?) {
                *c = match (c.take(), r) {
                    (Some(a), Some(b)) => Some((a + b)?),
                    (a, b) => a.or(b),
                };
            }
        }
        Ok(combined)
    }

    /// Applies the gradients with the optimizer (or, inside a gradient-accumulation group,
    /// adds them, weighted, to the group's) and records the step's logs; returns the total.
    #[allow(clippy::too_many_arguments)]
    fn finish_step(
        &self,
        compiled: &mut Compiled,
        acc: &mut Accumulator,
        terms: &StepTerms,
        batch: &Dataset,
        pass: &ForwardPass,
        trainable: Vec<Var>,
        gradients: Vec<Option<Tensor>>,
        group: Group,
    ) -> Result<f64> {
        let global;
        let (terms, gradients) = match &self.shard {
            Some(shard) => {
                let own = compiled.weighting.as_ref().map_or(0, |w| w.variables.len());
                let (t, g) = self.all_reduce_step(shard, terms, gradients, own)?;
                global = t;
                (&global, g)
            }
            None => (terms, gradients),
        };
        let mut pending = compiled.accumulated.take().unwrap_or_default();
        for (v, g) in trainable.into_iter().zip(gradients) {
            let Some(g) = g else { continue };
            let g = match group.scale {
                1.0 => g.detach(),
                s => (g.detach() * s)?,
            };
            let id = v.as_tensor().id();
            match pending.iter_mut().find(|(p, _)| p.as_tensor().id() == id) {
                Some(slot) => slot.1 = (&slot.1 + g)?,
                None => pending.push((v, g)),
            }
        }
        if !group.last {
            compiled.accumulated = Some(pending);
            self.record(compiled, acc, terms, batch, pass)?;
            self.observe_terms(compiled, terms, batch, false)?;
            return scalar(terms.shown());
        }
        let (params, gradients): (Vec<Var>, Vec<Tensor>) = pending.into_iter().unzip();
        let constraints = self.constraints_of(&params);
        compiled.iterations += 1;
        crate::optimizers::apply_step(
            compiled.optimizer.as_mut(),
            &params,
            gradients,
            compiled.iterations,
            &constraints,
        )?;
        self.record(compiled, acc, terms, batch, pass)?;
        self.observe_terms(compiled, terms, batch, true)?;
        scalar(terms.shown())
    }

    /// Shows a loss weighting strategy the step's terms and, after an update (`updated`), the
    /// terms on the same batch again when it asks for them (FAMO): one more forward pass, in
    /// inference mode so that it draws no dropout and moves no batch statistics.
    fn observe_terms(
        &self,
        compiled: &Compiled,
        terms: &StepTerms,
        batch: &Dataset,
        updated: bool,
    ) -> Result<()> {
        let Some(w) = &compiled.weighting else {
            return Ok(());
        };
        let values: Vec<f64> = terms.weighed.iter().map(scalar).collect::<Result<_>>()?;
        let samples = self
            .shard
            .as_ref()
            .map_or(batch.len(), StepShard::global_len);
        let wants_after = {
            let mut strategy = w.lock();
            strategy.observe(&values, samples as f64)?;
            strategy.needs_terms_after_update()
        };
        if updated && wants_after {
            let pass = self.run(&batch.inputs, false, &mut StepRandom::new(0, 0))?;
            let after = self.step_terms(compiled, batch, &pass, false, false, false)?;
            let values: Vec<f64> = after.weighed.iter().map(scalar).collect::<Result<_>>()?;
            w.lock().after_update(&values)?;
        }
        Ok(())
    }

    /// A rank's step terms and gradients summed over the ranks (one all-reduce), with rank 0's
    /// non-trainable weights (moving statistics) given to every rank. The last `own`
    /// gradients are a loss weighting strategy's variables': every rank differentiates the
    /// same objective of the global terms in them, so rank 0's gradient alone is the global
    /// one (the others give -0.0).
    fn all_reduce_step(
        &self,
        shard: &StepShard,
        terms: &StepTerms,
        mut gradients: Vec<Option<Tensor>>,
        own: usize,
    ) -> Result<(StepTerms, Vec<Option<Tensor>>)> {
        if shard.communicator().rank() > 0 {
            let at = gradients.len() - own;
            for g in gradients[at..].iter_mut().flatten() {
                *g = g.zeros_like()?.neg()?;
            }
        }
        let mut values = vec![scalar(terms.shown())?];
        for (_, v) in &terms.reported {
            values.push(scalar(v)?);
        }
        let state: Vec<_> = self
            .weights()
            .into_iter()
            .filter(|w| !w.trainable())
            .collect();
        let (gradients, values) = shard.all_reduce_step(self.dtype, gradients, values, &state)?;
        let value = |v: f64| Tensor::new(v, &candle_core::Device::Cpu).map_err(Error::from);
        let reported = terms
            .reported
            .iter()
            .zip(&values[1..])
            .map(|((name, _), &v)| Ok((name.clone(), value(v)?)))
            .collect::<Result<_>>()?;
        let terms = StepTerms {
            total: value(values[0])?,
            reported,
            labeled: None,
            added: None,
            // Already the global batch's (`StepShard::global_terms`).
            weighed: terms.weighed.iter().map(Tensor::detach).collect(),
            shown: None,
            parts: Vec::new(),
        };
        Ok((terms, gradients))
    }

    /// One training step on one batch, as Keras' `train_on_batch`: returns the batch's loss
    /// breakdown and metrics.
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// use kiln::prelude::*;
    /// let x = Input::new([1]);
    /// let y = Dense::new(1).use_bias(false).kernel_initializer(Initializer::Ones).apply(&x)?;
    /// let mut model = Model::new(&[x], &[y])?;
    /// model.compile(Compile::new(Sgd::new(0.1)).loss("mse"))?;
    /// let batch = Dataset::new(Tensor::new(&[[1f32]], &Device::Cpu)?, Tensor::new(&[[0f32]], &Device::Cpu)?)?;
    /// assert_eq!(model.train_on_batch(&batch)?.get("loss"), Some(1.0));
    /// let second = model.train_on_batch(&batch)?.get("loss").unwrap(); // w = 0.8 after one step
    /// assert!((second - 0.64).abs() < 1e-6);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// With [`Model::set_gradient_diagnostics`] on, the logs also hold the batch's per-term
    /// gradient norms and cosines (`grad_norm/<term>`, `grad_cos/<a>/<b>`).
    ///
    /// # Errors
    /// As [`Model::fit`].
    pub fn train_on_batch(&mut self, batch: &Dataset) -> Result<Logs> {
        let batch = batch.to_device(&self.device)?;
        // The step's randomness is keyed by the optimizer's iteration count.
        let mut random = StepRandom::new(0, self.compiled.as_ref().map_or(0, |c| c.iterations));
        let mut acc = Accumulator::default();
        let diagnostics = self.batch_diagnostics;
        self.train_step(&batch, &mut random, &mut acc, Group::WHOLE, diagnostics)?;
        Ok(acc.logs(""))
    }

    /// Turns per-term gradient diagnostics on or off for [`Model::train_on_batch`] (off by
    /// default), for a training loop of your own: each call's logs then also hold the batch's
    /// `grad_norm/<term>` and `grad_cos/<a>/<b>`, as [`Fit::gradient_diagnostics`] records
    /// them per epoch (`fit` follows its own `Fit` option, not this one). The update is the
    /// same with them on or off; the cost is one more backward pass per term.
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// use kiln::prelude::*;
    /// let x = Input::new([1]);
    /// let y = Dense::new(1).use_bias(false).kernel_initializer(Initializer::Ones)
    ///     .kernel_regularizer(L2::new(0.5)).apply(&x)?;
    /// let mut model = Model::new(&[x], &[y])?;
    /// model.compile(Compile::new(Sgd::new(0.1)).loss("mse"))?;
    /// model.set_gradient_diagnostics(true);
    /// let batch = Dataset::new(Tensor::new(&[[2f32]], &Device::Cpu)?, Tensor::new(&[[0f32]], &Device::Cpu)?)?;
    /// let logs = model.train_on_batch(&batch)?;
    /// // At w = 1: d/dw (2w)² = 8w = 8 and d/dw 0.5·w² = w = 1, in the same direction.
    /// assert_eq!(logs.get("grad_norm/dense_loss"), Some(8.0));
    /// assert_eq!(logs.get("grad_norm/l2"), Some(1.0));
    /// assert_eq!(logs.get("grad_cos/dense_loss/l2"), Some(1.0));
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn set_gradient_diagnostics(&mut self, on: bool) {
        self.batch_diagnostics = on;
    }

    /// Whether [`Model::train_on_batch`] records gradient diagnostics
    /// ([`Model::set_gradient_diagnostics`]).
    pub fn gradient_diagnostics(&self) -> bool {
        self.batch_diagnostics
    }

    /// Trains the model and returns the per-epoch logs: `loss`, `<output>_loss` (several
    /// outputs, or one beside added terms), each added term by name, the metrics, and their
    /// `val_` twins.
    ///
    /// # Errors
    /// [`Error::State`] before `compile` or when a callback stops the run with an error;
    /// [`Error::Data`] when the data do not fit the model (inputs, targets, sample or class
    /// weights) or `Fit`'s batch size is 0; [`Error::InvalidArgument`] for `Fit` values out of
    /// range; [`Error::LossContract`] when a loss does not return one value per sample, each
    /// from its own sample; [`Error::LossShape`] when the targets do not fit a loss;
    /// [`Error::AddedLossShape`] when an added term is not a scalar; [`Error::Graph`] when a
    /// layer fails on the batch.
    pub fn fit(&mut self, data: &Dataset, config: Fit) -> Result<History> {
        let Some(comm) = config.distributed.clone().filter(|c| c.size() > 1) else {
            return self.fit_here(data, config, None);
        };
        let verbose = config.verbose && comm.rank() == 0;
        let result = self.fit_here(data, config.verbose(verbose), Some(&comm));
        self.shard = None;
        if let Err(e) = &result {
            comm.fail(e);
        }
        result
    }

    /// [`Self::fit`] on this process, one rank of `comm` when given.
    fn fit_here(
        &mut self,
        data: &Dataset,
        config: Fit,
        comm: Option<&SharedCommunicator>,
    ) -> Result<History> {
        if self.compiled.is_none() {
            return Err(not_compiled());
        }
        if config.batch_size == 0 {
            return Err(Error::Data(
                "Fit::batch_size must be at least 1, got 0".into(),
            ));
        }
        if config.gradient_accumulation_steps == 0 {
            return Err(Error::InvalidArgument(
                "Fit::gradient_accumulation_steps must be at least 1 (1: an update every \
                 batch), got 0"
                    .into(),
            ));
        }
        if let Some(w) = self.compiled.as_ref().and_then(|c| c.weighting.as_ref()) {
            let strategy = w.lock();
            if strategy.combines_gradients() && config.gradient_accumulation_steps > 1 {
                return Err(Error::InvalidArgument(format!(
                    "loss weighting `{}` combines each batch's per-term gradients before its \
                     update, so it needs an update every batch: set \
                     gradient_accumulation_steps to 1 (got {})",
                    strategy.name(),
                    config.gradient_accumulation_steps
                )));
            }
            if strategy.needs_terms_after_update() && config.gradient_accumulation_steps > 1 {
                return Err(Error::InvalidArgument(format!(
                    "loss weighting `{}` compares each batch's terms before and after its \
                     update, so it needs an update every batch: set \
                     gradient_accumulation_steps to 1 (got {})",
                    strategy.name(),
                    config.gradient_accumulation_steps
                )));
            }
        }
        if !(0.0..1.0).contains(&config.validation_split) {
            return Err(Error::InvalidArgument(format!(
                "Fit::validation_split must be a finite number in [0, 1), got {}",
                config.validation_split
            )));
        }
        if let Some((class, w)) = config
            .class_weight
            .iter()
            .flatten()
            .find(|(_, w)| !(w.is_finite() && *w >= 0.0))
        {
            return Err(Error::InvalidArgument(format!(
                "Fit::class_weight: the weight of class {class} must be a finite number >= 0, got {w}"
            )));
        }
        let data = data.to_device(&self.device)?;
        let (mut train, split_val) =
            if config.validation_split > 0.0 && config.validation_data.is_none() {
                let (a, b) = data.split_tail(config.validation_split)?;
                (a, Some(b))
            } else {
                (data, None)
            };
        let validation = config.validation_data.clone().or(split_val);
        if config.validation_gradient_diagnostics && validation.is_none() {
            return Err(Error::InvalidArgument(
                "Fit::validation_gradient_diagnostics needs validation data: give \
                 validation_data (in a run file, [data] validation_path) or a \
                 validation_split > 0, or turn validation_gradient_diagnostics off"
                    .into(),
            ));
        }
        if train.is_empty() {
            return Err(Error::Data("fit got no training samples".into()));
        }
        if let Some(cw) = &config.class_weight {
            if self.outputs.len() != 1 {
                return Err(Error::Data(
                    "class_weight works for single-output models: give sample weights per output \
                     instead (Dataset::with_output_sample_weights)"
                        .into(),
                ));
            }
            let targets = train.targets.first().ok_or_else(|| {
                Error::Data("class_weight needs targets: the data has none".into())
            })?;
            let weights = crate::reduction::class_weights_to_sample_weights(targets, cw)?;
            let weights = match train.sample_weight_for(0) {
                Some(sw) => crate::reduction::mul_weights(sw, &weights)?,
                None => weights,
            };
            train.output_weights.clear();
            train = train.with_sample_weight(weights)?;
        }
        let n = train.len();
        if let Some(comm) = comm {
            let settings = format!(
                "{} {} {} {} {}",
                config.epochs, config.batch_size, config.seed, config.shuffle, config.initial_epoch
            );
            crate::distributed::check_fit(
                comm.as_ref(),
                &train,
                &self.weights(),
                config.batch_size,
                &settings,
            )?;
        }
        let steps = n.div_ceil(config.batch_size);
        let mut history = History::default();
        for cb in &config.callbacks {
            lock(cb).on_train_begin(self)?;
        }
        for (cb, state) in config.callbacks.iter().zip(&config.callback_states) {
            if let Some(state) = state {
                lock(cb).load_state(state)?;
            }
        }
        for (cb, tensors) in config.callbacks.iter().zip(&config.callback_tensors) {
            if !tensors.is_empty() {
                lock(cb).load_tensor_state(tensors)?;
            }
        }
        self.stop_requested = false;
        let mut stop = false;
        for epoch in config.initial_epoch..config.epochs {
            // Each epoch's shuffle depends on (seed, epoch) alone, and each step's masks on
            // (seed, step) alone (`crate::random`): resumable, and the same on every rank.
            let mut rng = StdRng::seed_from_u64(
                config.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            for cb in &config.callbacks {
                lock(cb).on_epoch_begin(epoch, self)?;
            }
            let mut order: Vec<u32> = (0..n as u32).collect();
            if config.shuffle {
                order.shuffle(&mut rng);
            }
            let mut progress = EpochProgress::new(config.verbose, steps, epoch, config.epochs);
            let mut acc = Accumulator::default();
            let sizes: Vec<usize> = order.chunks(config.batch_size).map(<[u32]>::len).collect();
            self.discard_accumulated();
            for (b, chunk) in order.chunks(config.batch_size).enumerate() {
                let batch = match comm {
                    Some(comm) => {
                        let (batch, shard) =
                            crate::distributed::shard_batch(&train, chunk, comm, self.dtype)?;
                        self.shard = Some(shard);
                        batch
                    }
                    None => train.select(chunk)?,
                };
                let group = Group::of(b, &sizes, config.gradient_accumulation_steps);
                let mut random = StepRandom::new(config.seed, (epoch * steps + b) as u64);
                let step = self.train_step(
                    &batch,
                    &mut random,
                    &mut acc,
                    group,
                    config.gradient_diagnostics,
                );
                self.shard = None;
                let batch_loss = step?;
                let running = acc.logs("");
                progress.train_step(b + 1, &running);
                for cb in &config.callbacks {
                    if lock(cb).on_batch_end(b, batch_loss, &running)? == Control::Stop {
                        stop = true;
                    }
                }
                if stop {
                    break;
                }
            }
            if let Some(comm) = comm {
                crate::distributed::merge_metrics(comm.as_ref(), acc.metrics_mut())?;
            }
            let mut logs = acc.logs("");
            if let (Some(val), false) = (&validation, stop) {
                progress.start_validation(val.len().div_ceil(config.batch_size));
                for (k, v) in self
                    .evaluate_logs(
                        val,
                        config.batch_size,
                        "val_",
                        None,
                        Some(&mut progress),
                        config.validation_gradient_diagnostics,
                    )?
                    .iter()
                {
                    logs.set(k, v);
                }
            }
            if let (Some(w), false) = (
                self.compiled.as_ref().and_then(|c| c.weighting.as_ref()),
                stop,
            ) {
                // The weights of the epoch's last step; then the strategy moves to the next
                // epoch's (before the callbacks, so that a checkpoint holds the new state).
                let mut strategy = w.lock();
                for (term, weight) in w.terms.iter().zip(strategy.weights()?) {
                    logs.set(format!("loss_weight/{term}"), weight);
                }
                strategy.end_epoch()?;
            }
            // Before the callbacks, so checkpoints (and resumed histories) keep it too.
            logs.set("epoch_time_s", progress.elapsed_s());
            if !stop {
                for cb in &config.callbacks {
                    // Callbacks that run later (checkpoints) see the states of those before.
                    self.callback_states =
                        config.callbacks.iter().map(|c| lock(c).state()).collect();
                    self.callback_tensors = config
                        .callbacks
                        .iter()
                        .map(|c| lock(c).tensor_state())
                        .collect();
                    if lock(cb).on_epoch_end(epoch, &mut logs, self)? == Control::Stop {
                        stop = true;
                        self.stop_requested = true;
                    }
                }
            }
            progress.finish(&logs);
            history.epochs.push(logs);
            if stop {
                break;
            }
        }
        // A group cut short by a callback is not applied, as the batches after it never ran.
        self.discard_accumulated();
        for cb in &config.callbacks {
            lock(cb).on_train_end(self)?;
        }
        Ok(history)
    }

    fn discard_accumulated(&mut self) {
        if let Some(c) = self.compiled.as_mut() {
            c.accumulated = None;
        }
    }

    /// The loss breakdown and metrics on `data`, in inference mode (same names as `fit`).
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// use kiln::prelude::*;
    /// let x = Input::new([1]);
    /// let y = Dense::new(1).use_bias(false).kernel_initializer(Initializer::Ones).apply(&x)?;
    /// let mut model = Model::new(&[x], &[y])?;
    /// model.compile(Compile::new(Sgd::new(0.1)).loss("mse"))?;
    /// let xs = Tensor::new(&[[1f32], [2.]], &Device::Cpu)?;
    /// let ys = Tensor::new(&[[0f32], [0.]], &Device::Cpu)?;
    /// let logs = model.evaluate(&Dataset::new(xs, ys)?, 32)?;
    /// assert_eq!(logs.get("loss"), Some(2.5)); // (1 + 4) / 2
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`Model::fit`], on the evaluation data.
    pub fn evaluate(&self, data: &Dataset, batch_size: usize) -> Result<Logs> {
        self.evaluate_logs(data, batch_size, "", None, None, false)
    }

    /// The loss breakdown and metrics on inputs perturbed by an attack (FGSM or PGD against the
    /// compiled losses), to measure robustness. The adversarial training term, if any, is not
    /// part of these logs' `loss`.
    ///
    /// ```
    /// use kiln::candle::Device;
    /// use kiln::prelude::*;
    /// let data = kiln::data::digits(&Device::Cpu)?.slice(0, 200)?;
    /// let x = Input::new([64]);
    /// let y = Dense::new(10).apply(&x)?;
    /// let mut model = Model::new(&[x], &[y])?;
    /// model.compile(Compile::new(Adam::new(1e-2)).loss(SparseCategoricalCrossentropy::new().from_logits(true)))?;
    /// model.fit(&data, Fit::new().epochs(5).quiet())?;
    /// let clean = model.evaluate(&data, 100)?.get("loss").unwrap();
    /// let attacked = model.evaluate_under_attack(&data, 100, &Adversarial::fgsm(0.1))?.get("loss").unwrap();
    /// assert!(attacked > clean);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`Model::evaluate`], and [`Error::InvalidArgument`] for an attack that does not fit
    /// the model's inputs.
    pub fn evaluate_under_attack(
        &self,
        data: &Dataset,
        batch_size: usize,
        attack: &Adversarial,
    ) -> Result<Logs> {
        attack.validate(self.inputs.len())?;
        self.evaluate_logs(data, batch_size, "", Some(attack), None, false)
    }

    fn evaluate_logs(
        &self,
        data: &Dataset,
        batch_size: usize,
        prefix: &str,
        attack: Option<&Adversarial>,
        progress: Option<&mut EpochProgress>,
        diagnostics: bool,
    ) -> Result<Logs> {
        // On kiln's pool, as training: its kernels' parallel pieces stay there.
        crate::runtime::on_matmul_pool(|| {
            self.evaluate_logs_here(data, batch_size, prefix, attack, progress, diagnostics)
        })
    }

    /// [`Self::evaluate_logs`] on the calling thread.
    fn evaluate_logs_here(
        &self,
        data: &Dataset,
        batch_size: usize,
        prefix: &str,
        attack: Option<&Adversarial>,
        mut progress: Option<&mut EpochProgress>,
        diagnostics: bool,
    ) -> Result<Logs> {
        let compiled = self.compiled.as_ref().ok_or_else(not_compiled)?;
        if batch_size == 0 {
            return Err(Error::Data(
                "the evaluation batch_size must be at least 1, got 0".into(),
            ));
        }
        let data = data.to_device(&self.device)?;
        let mut acc = Accumulator::default();
        let trainable: Vec<Var> = match diagnostics {
            true => self
                .trainable_weights()
                .into_iter()
                .map(|w| w.var)
                .collect(),
            false => Vec::new(),
        };
        let mut start = 0;
        while start < data.len() {
            let len = batch_size.min(data.len() - start);
            let mut batch = data.slice(start, len)?;
            // An attack's random start, keyed by the batch: the same at every evaluation.
            let mut random = StepRandom::new(0, (start / batch_size) as u64);
            if let Some(attack) = attack {
                batch.inputs = self.attack(compiled, attack, &batch, None, false, &mut random)?;
            }
            let pass = self.run(&batch.inputs, false, &mut random)?;
            let adversarial_term = attack.is_none().then(|| self.adversarial_term()).flatten();
            let mut terms = self.step_terms(
                compiled,
                &batch,
                &pass,
                false,
                adversarial_term.is_some(),
                false,
            )?;
            // The adversarial term has its validation twin too, on perturbed inputs of the batch.
            if let Some((name, adversarial)) = adversarial_term {
                let x_adv =
                    self.attack(compiled, &adversarial, &batch, None, false, &mut random)?;
                let adv_pass = self.run(&x_adv, false, &mut random)?;
                let labeled = self
                    .compiled_loss(compiled, &batch, &adv_pass)?
                    .total
                    .ok_or_else(no_labeled_loss)?;
                let term = (labeled * adversarial.weight())?;
                terms.push_detached(name.clone(), term.detach())?;
                terms.parts.push((name, term));
            }
            if diagnostics {
                self.record_term_diagnostics(&mut acc, &terms, &trainable, len)?;
            }
            self.record(compiled, &mut acc, &terms, &batch, &pass)?;
            start += len;
            if let Some(progress) = progress.as_deref_mut() {
                progress.validation_step(start.div_ceil(batch_size));
            }
        }
        Ok(acc.logs(prefix))
    }
}

pub(super) fn no_labeled_loss() -> Error {
    Error::Compile(
        "adversarial regularization needs a compile-time loss to attack: give compile() a loss"
            .into(),
    )
}

fn lock(callback: &SharedCallback) -> std::sync::MutexGuard<'_, dyn Callback + 'static> {
    callback.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use candle_core::{Device, Tensor};

    /// Prediction and evaluation run where training does, on kiln's pool, with the same float
    /// settings: a subnormal input (1e-39) counts as zero there, as in a training step.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn predict_and_evaluate_run_like_training() {
        let x = Input::new([1]);
        let y = Dense::new(1)
            .kernel_initializer(Initializer::Ones)
            .apply(&x)
            .unwrap();
        let mut model = Model::new(&[x], &[y]).unwrap();
        model
            .compile(Compile::new(Sgd::new(0.0)).loss("mae"))
            .unwrap();
        let inputs = Tensor::new(&[[1e-39f32]], &Device::Cpu).unwrap();
        let out: Vec<Vec<f32>> = model.predict(std::slice::from_ref(&inputs), 1).unwrap()[0]
            .to_vec2()
            .unwrap();
        assert_eq!(out, vec![vec![0.0]]);
        let target = Tensor::new(&[[0f32]], &Device::Cpu).unwrap();
        let logs = model
            .evaluate(&Dataset::new(inputs, target).unwrap(), 1)
            .unwrap();
        assert_eq!(logs.get("loss"), Some(0.0));
    }

    /// Training gives the same weights, bit for bit, split across kiln's pool and on one
    /// thread, so the thread choice never changes what is learned. The models are W2 in small:
    /// focal loss, L2 on the kernels and FGSM, with products of at least 2²¹ multiply-adds and
    /// passes of at least 2¹⁵ elements, so that the Dense products split by columns, dX and dW
    /// run side by side and the elementwise passes split. The second has 784 inputs: `gemm`
    /// sums in chunks that depend on a call's shape, so a product split into 64-column pieces
    /// must be split the same way on one thread. (On a 1-core machine both ways are the same
    /// code and the test shows nothing.)
    #[test]
    fn the_pool_and_one_thread_train_the_same() {
        let weights = |(inputs, width): (usize, usize),
                       pooled: bool,
                       steps: usize|
         -> crate::Result<Vec<Vec<f32>>> {
            let x = Input::new([inputs]);
            let h = Dense::new(width)
                .activation(Activation::Relu)
                .kernel_regularizer(L2::new(0.01))
                .apply(&x)?;
            let y = Dense::new(10).kernel_regularizer(L2::new(0.01)).apply(&h)?;
            let mut model = Model::new(&[x], &[y])?;
            model.add_loss_term("adversarial", Adversarial::fgsm(0.05).multiplier(0.5))?;
            model.compile(
                Compile::new(Adam::new(1e-2))
                    .loss(CategoricalFocalCrossentropy::new().from_logits(true)),
            )?;
            model.thread_choice = crate::runtime::ThreadChoice::fixed(pooled);
            let d = Device::Cpu;
            let features: Vec<f32> = (0..(64 * inputs) as u32)
                .map(|i| (i * 37 % 101) as f32 / 101.0)
                .collect();
            let features = Tensor::from_vec(features, (64, inputs), &d)?;
            let labels: Vec<f32> = (0..64 * 10)
                .map(|i| f32::from(u8::from(i % 10 == (i / 10) % 7)))
                .collect();
            let data = Dataset::new(features, Tensor::from_vec(labels, (64, 10), &d)?)?;
            for _ in 0..steps {
                model.train_on_batch(&data)?;
            }
            model
                .weights()
                .iter()
                .map(|w| Ok(w.var.as_tensor().flatten_all()?.to_vec1::<f32>()?))
                .collect()
        };
        for shape in [(256, 256), (784, 128)] {
            let (pooled, alone) = (
                weights(shape, true, 3).unwrap(),
                weights(shape, false, 3).unwrap(),
            );
            let differ = pooled
                .iter()
                .flatten()
                .zip(alone.iter().flatten())
                .filter(|(p, a)| p.to_bits() != a.to_bits())
                .count();
            assert_eq!(differ, 0, "{shape:?}: {differ} weights differ");
            // Training moved them: the comparison is not between two untouched models.
            assert_ne!(pooled, weights(shape, true, 0).unwrap());
        }
    }
}
