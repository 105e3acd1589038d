//! `compile`: the optimizer, the compile-time losses per output, their weights, the metrics,
//! and the names of every term that will be reported.

use super::Model;
use crate::error::{Error, Result};
use crate::loss_weighting::Strategy;
use crate::losses::{Loss, LossSpec};
use crate::metrics::{Metric, MetricSpec};
use crate::optimizers::Optimizer;
use std::sync::{Arc, Mutex};

/// A per-output setting given once for all outputs, as a list in output order, or by name.
#[derive(Clone, Debug)]
enum PerOutput<T> {
    Unset,
    All(T),
    List(Vec<T>),
    Named(Vec<(String, T)>),
}

/// What `Model::compile` takes: an optimizer, losses, loss weights and metrics.
///
/// ```
/// use kiln::prelude::*;
/// let x = Input::new([4]);
/// let h = Dense::new(8).activation(Activation::Relu).apply(&x)?;
/// let digit = Dense::new(10).with_name("digit").apply(&h)?;
/// let parity = Dense::new(1).with_name("parity").apply(&h)?;
/// let mut model = Model::new(&[x], &[digit, parity])?;
/// model.compile(
///     Compile::new(Adam::new(1e-3))
///         .loss_for("digit", SparseCategoricalCrossentropy::new().from_logits(true))
///         .loss_for("parity", BinaryCrossentropy::new().from_logits(true))
///         .loss_weight_for("parity", 0.5)
///         .metric_for("digit", Accuracy::sparse()),
/// )?;
/// assert!(model.compile(Compile::new(Adam::new(1e-3)).loss_for("nope", "mse")).is_err());
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Compile {
    optimizer: Box<dyn Optimizer>,
    losses: PerOutput<LossSpec>,
    loss_weights: PerOutput<f64>,
    /// (output, metric, weighted by the sample weights).
    metrics: Vec<(Option<String>, MetricSpec, bool)>,
    loss_weighting: Option<Box<dyn Strategy>>,
    weight_added_terms: bool,
    probability_rule: ProbabilityRule,
}

/// How a crossentropy with `from_logits = false` reads an output that ends in softmax or
/// sigmoid: the two rules Keras has used, which differ on saturated outputs.
///
/// kiln's default is [`ProbabilityRule::Clipped`], Keras 3's rule on JAX, PyTorch and NumPy:
/// the loss sees what the model outputs, whatever layer made it, and the loss values match the
/// reference cases written by Keras 3 on JAX. Keras 2 (and Keras 3 on TensorFlow) computes
/// the crossentropy from the logits behind the activation instead
/// ([`ProbabilityRule::Logits`]): exact where clipping caps a wrong, confident prediction's
/// loss at `-log(1e-7) ≈ 16.1` and gives it almost no gradient.
///
/// ```
/// use kiln::prelude::*;
/// let x = Input::new([4]);
/// let y = Dense::new(3).activation(Activation::Softmax).apply(&x)?;
/// let mut model = Model::new(&[x], &[y])?;
/// // Keras 2: categorical crossentropy from the logits behind the softmax.
/// model.compile(
///     Compile::new(Adam::new(1e-3))
///         .loss(CategoricalCrossentropy::new())
///         .probability_rule(ProbabilityRule::Logits),
/// )?;
/// assert_eq!(ProbabilityRule::default(), ProbabilityRule::Clipped);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ProbabilityRule {
    /// From the output's probabilities, clipped to `[1e-7, 1 - 1e-7]` (Keras 3 on JAX).
    #[default]
    Clipped,
    /// From the logits behind a final softmax (categorical and sparse categorical
    /// crossentropy) or sigmoid (binary crossentropy) of a Dense or Activation layer, as
    /// Keras 2 does; an output made otherwise keeps the clipped rule, as in Keras 2.
    Logits,
}

impl Compile {
    /// Starts a compile configuration with this optimizer.
    pub fn new(optimizer: impl Optimizer + 'static) -> Self {
        Self::from_boxed(Box::new(optimizer))
    }
    /// Starts a compile configuration with an already boxed optimizer.
    pub fn from_boxed(optimizer: Box<dyn Optimizer>) -> Self {
        Self {
            optimizer,
            losses: PerOutput::Unset,
            loss_weights: PerOutput::Unset,
            metrics: Vec::new(),
            loss_weighting: None,
            weight_added_terms: false,
            probability_rule: ProbabilityRule::Clipped,
        }
    }
    /// Sets the weights of the compiled per-output losses automatically while training, with
    /// a strategy of [`crate::loss_weighting`] (uncertainty, dynamic weight average, FAMO,
    /// PCGrad, GradNorm). Each output's fixed `loss_weight` still scales its term first. The
    /// weights are logged per epoch as `loss_weight/<term>`, and saved in checkpoints and
    /// with [`crate::Model::save_weights`].
    ///
    /// ```
    /// use kiln::loss_weighting::DynamicWeightAverage;
    /// use kiln::prelude::*;
    /// let x = Input::new([2]);
    /// let a = Dense::new(1).with_name("a").apply(&x)?;
    /// let b = Dense::new(1).with_name("b").apply(&x)?;
    /// let mut model = Model::new(&[x], &[a, b])?;
    /// model.compile(Compile::new(Sgd::new(0.1)).loss("mse").loss_weighting(DynamicWeightAverage::new()))?;
    /// let xs = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu)?;
    /// let data = Dataset::multi(vec![xs.clone()], vec![xs.narrow(1, 0, 1)?, xs.narrow(1, 1, 1)?])?;
    /// let history = model.fit(&data, Fit::new().epochs(3).quiet())?;
    /// assert_eq!(history.get("loss_weight/a_loss").unwrap()[0], 1.0); // 1 until two epochs are done
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn loss_weighting(mut self, strategy: impl Strategy + 'static) -> Self {
        self.loss_weighting = Some(Box::new(strategy));
        self
    }
    /// [`Compile::loss_weighting`] with an already boxed strategy.
    pub fn loss_weighting_boxed(mut self, strategy: Box<dyn Strategy>) -> Self {
        self.loss_weighting = Some(strategy);
        self
    }
    /// Whether the loss weighting strategy also weighs the added terms (regularizers,
    /// `add_loss` terms), each as one more term after the outputs' (default: only the
    /// compiled per-output losses; added terms are then summed as they are).
    pub fn weight_added_terms(mut self, yes: bool) -> Self {
        self.weight_added_terms = yes;
        self
    }
    /// How crossentropies with `from_logits = false` read softmax and sigmoid outputs (default
    /// [`ProbabilityRule::Clipped`]; [`ProbabilityRule::Logits`] for Keras 2's numbers).
    pub fn probability_rule(mut self, rule: ProbabilityRule) -> Self {
        self.probability_rule = rule;
        self
    }
    /// One loss for every output (a Keras single loss).
    pub fn loss(mut self, loss: impl Into<LossSpec>) -> Self {
        self.losses = PerOutput::All(loss.into());
        self
    }
    /// The loss of the output named `output` (a Keras dict entry). Outputs given no loss are
    /// not trained by a compile-time loss.
    pub fn loss_for(mut self, output: impl Into<String>, loss: impl Into<LossSpec>) -> Self {
        let entry = (output.into(), loss.into());
        match &mut self.losses {
            PerOutput::Named(v) => v.push(entry),
            _ => self.losses = PerOutput::Named(vec![entry]),
        }
        self
    }
    /// One loss per output, in output order (a Keras list).
    pub fn losses(mut self, losses: Vec<LossSpec>) -> Self {
        self.losses = PerOutput::List(losses);
        self
    }
    /// One weight for every output's loss.
    pub fn loss_weight(mut self, weight: f64) -> Self {
        self.loss_weights = PerOutput::All(weight);
        self
    }
    /// The weight of the named output's loss (default 1).
    pub fn loss_weight_for(mut self, output: impl Into<String>, weight: f64) -> Self {
        let entry = (output.into(), weight);
        match &mut self.loss_weights {
            PerOutput::Named(v) => v.push(entry),
            _ => self.loss_weights = PerOutput::Named(vec![entry]),
        }
        self
    }
    /// One weight per output, in output order.
    pub fn loss_weights(mut self, weights: Vec<f64>) -> Self {
        self.loss_weights = PerOutput::List(weights);
        self
    }
    /// A metric reported for every output (Keras' `metrics`): not weighted by the sample or
    /// class weights, as in Keras; a mask (padding) still leaves entries out.
    pub fn metric(mut self, metric: impl Into<MetricSpec>) -> Self {
        self.metrics.push((None, metric.into(), false));
        self
    }
    /// A metric reported for the named output.
    pub fn metric_for(mut self, output: impl Into<String>, metric: impl Into<MetricSpec>) -> Self {
        self.metrics
            .push((Some(output.into()), metric.into(), false));
        self
    }
    /// A metric weighted by the sample weights (and class weights) of the data, for every output
    /// (Keras' `weighted_metrics`). Logged under the metric's name, or `weighted_<name>` when an
    /// unweighted metric of the same output already has that name, as Keras does.
    ///
    /// ```
    /// use kiln::prelude::*;
    /// let x = Input::new([2]);
    /// let y = Dense::new(1).apply(&x)?;
    /// let mut model = Model::new(&[x], &[y])?;
    /// model.compile(Compile::new(Sgd::new(0.1)).loss("mse").metric("mae").weighted_metric("mae"))?;
    /// assert_eq!(model.metric_names(), vec!["mae", "weighted_mae"]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn weighted_metric(mut self, metric: impl Into<MetricSpec>) -> Self {
        self.metrics.push((None, metric.into(), true));
        self
    }
    /// A weighted metric for the named output.
    pub fn weighted_metric_for(
        mut self,
        output: impl Into<String>,
        metric: impl Into<MetricSpec>,
    ) -> Self {
        self.metrics
            .push((Some(output.into()), metric.into(), true));
        self
    }
}

/// A resolved compile-time loss of one output.
pub(crate) struct OutputLoss {
    pub(crate) output: usize,
    pub(crate) loss: Arc<dyn Loss>,
    pub(crate) weight: f64,
    /// `<output>_loss`, reported whenever the total has more than one part (several
    /// compile-time losses, or one beside added terms).
    pub(crate) log_name: String,
    /// Whether the loss has passed the per-sample probe (`contract.rs`) on a real batch.
    pub(crate) probed: std::sync::atomic::AtomicBool,
    /// Under [`ProbabilityRule::Logits`], when the output ends in the activation this loss
    /// undoes: the same loss reading the logits behind it.
    pub(crate) on_logits: Option<Arc<dyn Loss>>,
}

/// A resolved metric of one output.
pub(crate) struct OutputMetric {
    pub(crate) output: usize,
    /// The configuration; each epoch (and each validation pass) folds batches into a
    /// [`Metric::fresh`] copy of it.
    pub(crate) metric: Arc<dyn Metric>,
    /// Whether the data's sample weights apply (Keras' `weighted_metrics`).
    pub(crate) weighted: bool,
    /// `[<output>_]<name>`.
    pub(crate) log_name: String,
    /// The Keras name it is exported under: the name it was given by, else
    /// [`Metric::keras_name`].
    pub(crate) keras_name: Option<String>,
}

/// The state `compile` leaves on the model.
pub(crate) struct Compiled {
    pub(crate) optimizer: Box<dyn Optimizer>,
    pub(crate) losses: Vec<OutputLoss>,
    pub(crate) metrics: Vec<OutputMetric>,
    pub(crate) iterations: u64,
    /// The weighted gradients of a gradient-accumulation group not yet applied.
    pub(crate) accumulated: Option<Vec<(candle_core::Var, candle_core::Tensor)>>,
    /// The loss weighting strategy, if any.
    pub(crate) weighting: Option<Weighting>,
}

/// A loss weighting strategy as compile leaves it: its terms and its state.
pub(crate) struct Weighting {
    /// Behind a lock, so that a step (which holds the compiled state shared) can advance it.
    pub(crate) strategy: Mutex<Box<dyn Strategy>>,
    /// The terms it weighs, in order: the outputs' `<output>_loss`, then (with
    /// `weight_added_terms`) the added terms by name.
    pub(crate) terms: Vec<String>,
    /// How many of `terms` are outputs' losses.
    pub(crate) outputs: usize,
    /// The strategy's variables the model's optimizer trains, by name.
    pub(crate) variables: Vec<(String, candle_core::Var)>,
}

impl Weighting {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Box<dyn Strategy>> {
        self.strategy.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn output_index(names: &[String], name: &str, what: &str) -> Result<usize> {
    names.iter().position(|n| n == name).ok_or_else(|| {
        Error::Compile(format!(
            "{what} names output `{name}`, but the model's outputs are {names:?}"
        ))
    })
}

fn per_output<T: Clone>(
    setting: PerOutput<T>,
    names: &[String],
    what: &str,
) -> Result<Vec<Option<T>>> {
    let n = names.len();
    Ok(match setting {
        PerOutput::Unset => vec![None; n],
        PerOutput::All(v) => vec![Some(v); n],
        PerOutput::List(list) => {
            if list.len() != n {
                return Err(Error::Compile(format!(
                    "got {} {what} for {n} outputs {names:?}: give one per output, in order, or one \
                     for all",
                    list.len()
                )));
            }
            list.into_iter().map(Some).collect()
        }
        PerOutput::Named(entries) => {
            let mut out = vec![None; n];
            for (name, v) in entries {
                let i = output_index(names, &name, what)?;
                if out[i].is_some() {
                    return Err(Error::Compile(format!(
                        "{what} for output `{name}` is given twice"
                    )));
                }
                out[i] = Some(v);
            }
            out
        }
    })
}

impl Model {
    /// Configures the model for training: optimizer, compile-time losses, loss weights, metrics.
    ///
    /// # Errors
    /// [`Error::Compile`] when a name or count does not fit the outputs, a loss weight is not
    /// finite, two terms would be reported under one name, or the model has nothing to
    /// optimize; [`Error::InvalidArgument`] when the optimizer's or a loss's hyperparameters
    /// are out of range or a loss name is unknown.
    pub fn compile(&mut self, config: Compile) -> Result<()> {
        crate::optimizers::validate(config.optimizer.as_ref())?;
        let names = self.output_names.clone();
        let losses = per_output(config.losses, &names, "losses")?;
        let weights = per_output(config.loss_weights, &names, "loss weights")?;
        let n_losses = losses.iter().filter(|l| l.is_some()).count();
        let mut resolved = Vec::new();
        for (i, (loss, weight)) in losses.into_iter().zip(weights).enumerate() {
            match loss {
                Some(spec) => {
                    let loss = spec.resolve()?;
                    loss.validate()?;
                    let weight = weight.unwrap_or(1.0);
                    if !weight.is_finite() {
                        return Err(Error::Compile(format!(
                            "loss weight of output `{}` is {weight}",
                            names[i]
                        )));
                    }
                    let on_logits = match config.probability_rule {
                        ProbabilityRule::Clipped => None,
                        ProbabilityRule::Logits => loss
                            .logits_twin()
                            .filter(|(act, _)| self.output_activation(i) == Some(*act))
                            .map(|(_, twin)| twin),
                    };
                    resolved.push(OutputLoss {
                        output: i,
                        loss,
                        weight,
                        log_name: format!("{}_loss", names[i]),
                        probed: Default::default(),
                        on_logits,
                    });
                }
                None if weight.is_some() && n_losses > 0 => {
                    return Err(Error::Compile(format!(
                        "a loss weight is given for output `{}`, which has no loss",
                        names[i]
                    )));
                }
                None => {}
            }
        }
        let has_regularizer = self
            .weights()
            .iter()
            .any(|w| w.trainable() && w.regularizer.is_some())
            || self
                .layers
                .iter()
                .any(|(_, l)| l.lock().activity_regularizer().is_some());
        if resolved.is_empty() && self.added.is_empty() && !has_regularizer {
            return Err(Error::Compile(
                "the model has no loss to optimize: give compile() a loss or call add_loss()"
                    .into(),
            ));
        }
        let adversarial: Vec<_> = self
            .added
            .iter()
            .filter_map(|(_, l)| l.adversarial())
            .collect();
        if adversarial.len() > 1 {
            return Err(Error::Compile(
                "only one adversarial term can be added to a model".into(),
            ));
        }
        if let Some(adv) = adversarial.first() {
            adv.validate(self.inputs.len())?;
            if resolved.is_empty() {
                return Err(Error::Compile(
                    "adversarial regularization needs a compile-time loss to attack: give compile() a loss".into(),
                ));
            }
        }
        let mut metrics: Vec<OutputMetric> = Vec::new();
        for (target, spec, weighted) in config.metrics {
            let metric: Arc<dyn Metric> = Arc::from(spec.resolve()?);
            let keras_name = match &spec {
                MetricSpec::Named(n) => Some(n.clone()),
                MetricSpec::Metric(_) => metric.keras_name(),
            };
            let outputs: Vec<usize> = match &target {
                Some(name) => vec![output_index(&names, name, "a metric")?],
                None => (0..names.len()).collect(),
            };
            for output in outputs {
                let prefixed = |name: &str| match names.len() {
                    1 => name.to_string(),
                    _ => format!("{}_{name}", names[output]),
                };
                let mut log_name = prefixed(metric.name());
                let clashes = |n: &str| metrics.iter().any(|m| !m.weighted && m.log_name == n);
                if weighted && clashes(&log_name) {
                    log_name = prefixed(&format!("weighted_{}", metric.name()));
                }
                metrics.push(OutputMetric {
                    output,
                    metric: metric.clone(),
                    weighted,
                    log_name,
                    keras_name: keras_name.clone(),
                });
            }
        }
        // Every reported name must be unique, or the breakdown would be ambiguous.
        let mut reported: Vec<String> = vec!["loss".into()];
        reported.extend(resolved.iter().map(|l| l.log_name.clone()));
        reported.extend(self.regularizer_term_names());
        reported.extend(self.added.iter().map(|(n, _)| n.clone()));
        reported.extend(metrics.iter().map(|m| m.log_name.clone()));
        let mut seen = std::collections::HashSet::new();
        for name in &reported {
            if !seen.insert(name) {
                return Err(Error::Compile(format!(
                    "two terms or metrics would both be reported as `{name}`: rename the added \
                     loss or the metric (a metric's `with_name`, or `as = \"…\"` in a run file)"
                )));
            }
        }
        let weighting = match config.loss_weighting {
            Some(strategy) => Some(self.weighting(
                strategy,
                config.optimizer.as_ref(),
                &resolved,
                config.weight_added_terms,
                !adversarial.is_empty(),
            )?),
            None if config.weight_added_terms => {
                return Err(Error::Compile(
                    "weight_added_terms is set but no loss weighting strategy is given: add \
                     one with loss_weighting(...), or drop weight_added_terms"
                        .into(),
                ))
            }
            None => None,
        };
        self.compiled = Some(Compiled {
            optimizer: config.optimizer,
            losses: resolved,
            metrics,
            iterations: 0,
            accumulated: None,
            weighting,
        });
        Ok(())
    }

    /// The strategy's terms, checked, and its fresh state.
    fn weighting(
        &self,
        mut strategy: Box<dyn Strategy>,
        optimizer: &dyn crate::optimizers::Optimizer,
        losses: &[OutputLoss],
        added: bool,
        adversarial: bool,
    ) -> Result<Weighting> {
        strategy.validate()?;
        let name = strategy.name().to_string();
        let mut terms: Vec<String> = losses.iter().map(|l| l.log_name.clone()).collect();
        if added {
            if adversarial {
                return Err(Error::Compile(format!(
                    "loss weighting `{name}` with weight_added_terms cannot weigh an \
                     adversarial term yet: weigh the outputs' losses only (drop \
                     weight_added_terms) or remove the adversarial term"
                )));
            }
            terms.extend(self.regularizer_term_names());
            terms.extend(self.added.iter().map(|(n, _)| n.clone()));
        }
        if terms.len() < 2 {
            return Err(Error::Compile(format!(
                "loss weighting `{name}` needs at least two terms to weigh, and the model has \
                 {terms:?}: give several outputs a loss{}",
                if added {
                    ""
                } else {
                    ", or set weight_added_terms to weigh the added terms too"
                }
            )));
        }
        strategy.adopt_optimizer(optimizer)?;
        strategy.begin(&terms, self.dtype, &self.device)?;
        let variables = strategy.variables();
        Ok(Weighting {
            strategy: Mutex::new(strategy),
            terms,
            outputs: losses.len(),
            variables,
        })
    }

    /// Names of the terms regularizers add: `<name>` for weights, `activity_<name>` for outputs.
    fn regularizer_term_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        let mut push = |n: String| {
            if !names.contains(&n) {
                names.push(n);
            }
        };
        for w in self.weights() {
            if let (true, Some(r)) = (w.trainable(), &w.regularizer) {
                push(r.name().to_string());
            }
        }
        for (_, l) in &self.layers {
            if let Some(r) = l.lock().activity_regularizer() {
                push(format!("activity_{}", r.name()));
            }
        }
        names
    }

    /// The log names of the compiled metrics, in order (before any `val_` prefix; a metric with
    /// one value per class adds `_0`, `_1`, … to its name in the logs).
    pub fn metric_names(&self) -> Vec<String> {
        self.compiled
            .iter()
            .flat_map(|c| c.metrics.iter().map(|m| m.log_name.clone()))
            .collect()
    }

    /// Whether `compile` has been called.
    pub fn is_compiled(&self) -> bool {
        self.compiled.is_some()
    }

    /// The optimizer's learning rate, once compiled.
    pub fn learning_rate(&self) -> Option<f64> {
        self.compiled.as_ref().map(|c| c.optimizer.learning_rate())
    }

    /// Changes the optimizer's learning rate (for schedules and callbacks).
    ///
    /// # Errors
    /// [`Error::State`] before `compile`, and when the optimizer's rate follows a
    /// [`crate::optimizers::LearningRateSchedule`] (as Keras refuses to set it then).
    pub fn set_learning_rate(&mut self, lr: f64) -> Result<()> {
        let c = self.compiled.as_mut().ok_or_else(not_compiled)?;
        if let Some(s) = c.optimizer.schedule() {
            return Err(Error::State(format!(
                "set_learning_rate({lr}): the optimizer `{}` follows the learning rate schedule \
                 {}, which sets every step's rate: drop the schedule to set the rate by hand",
                c.optimizer.name(),
                s.class_name()
            )));
        }
        c.optimizer.set_learning_rate(lr);
        Ok(())
    }

    /// The learning-rate schedule the compiled optimizer follows, if any.
    ///
    /// ```
    /// use kiln::prelude::*;
    /// use kiln::optimizers::LearningRateSchedule;
    /// let x = Input::new([2]);
    /// let mut model = Model::new(&[x.clone()], &[Dense::new(1).apply(&x)?])?;
    /// let s = LearningRateSchedule::CosineDecay {
    ///     initial_learning_rate: 0.1, decay_steps: 100.0, alpha: 0.0,
    ///     warmup_target: None, warmup_steps: 0.0,
    /// };
    /// model.compile(Compile::new(Sgd::new(0.1).with_schedule(s)).loss("mse"))?;
    /// assert_eq!(model.learning_rate_schedule().unwrap().class_name(), "CosineDecay");
    /// assert!(model.set_learning_rate(0.01).is_err());
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn learning_rate_schedule(&self) -> Option<&crate::optimizers::LearningRateSchedule> {
        self.compiled.as_ref().and_then(|c| c.optimizer.schedule())
    }
}

pub(crate) fn not_compiled() -> Error {
    Error::State("the model is not compiled: call model.compile(...) before fit or evaluate".into())
}
