//! GradNorm (Chen, Badrinarayanan, Lee and Rabinovich 2018, "GradNorm: Gradient Normalization
//! for Adaptive Loss Balancing in Deep Multitask Networks"): task weights `w_i`, learned so
//! that each term's gradient norm at a shared layer, `G_i = ‖∇_W w_i L_i‖`, tracks the mean
//! norm scaled by how far the term lags behind: the target `Ḡ · r_i^α`, with
//! `r_i = L̃_i / mean(L̃)` and `L̃_i = L_i(t) / L_i(0)`.

use super::{bits, from_bits, scaled_sum, weighted_sum, GradientStep, Strategy};
use crate::error::{Error, Result};
use crate::optimizers::Optimizer;
use candle_core::{DType, Device, Tensor, Var};

/// GradNorm: each step, the model's gradient is `Σ w_i ∇L_i` with the current weights; then
/// the weights take one step of their own optimizer on `L_grad = Σ_i |G_i − Ḡ·r_i^α|` (the
/// target held constant, as the paper), and are renormalized to sum to the number of terms.
/// `L_i(0)` are the terms of the first training step. As in the paper nothing keeps a
/// weight above 0: with a large learning rate one can cross it (and is pulled back); watch
/// `loss_weight/<term>` and lower [`GradNorm::learning_rate`] if it does.
///
/// `W` is the last shared layer's trainable weights (kernel and bias): by default the last
/// layer, in the model's weight order, whose weights every weighed term's gradient reaches;
/// [`GradNorm::layer`] names another. The weights' optimizer is a fresh copy of the model's
/// (the same family and hyperparameters, as the paper), with its own learning rate
/// ([`GradNorm::learning_rate`], default the model's at compile); it applies its plain update
/// rule (no clipping, no decoupled weight decay). The weights, their optimizer's state and
/// `L(0)` are saved in checkpoints.
///
/// Cost per step: one backward pass per weighed term (instead of one for the total), plus one
/// for the terms it does not weigh; the norms are over `W` alone.
///
/// ```
/// use kiln::loss_weighting::GradNorm;
/// use kiln::prelude::*;
/// let x = Input::new([4]);
/// let h = Dense::new(8).with_name("trunk").activation(Activation::Tanh).apply(&x)?;
/// let a = Dense::new(3).with_name("a").apply(&h)?;
/// let b = Dense::new(1).with_name("b").apply(&h)?;
/// let mut model = Model::new(&[x], &[a, b])?;
/// model.compile(
///     Compile::new(Adam::new(1e-3))
///         .loss_for("a", SparseCategoricalCrossentropy::new().from_logits(true))
///         .loss_for("b", "mse")
///         .loss_weighting(GradNorm::new().alpha(1.5).learning_rate(0.025).layer("trunk")),
/// )?;
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct GradNorm {
    alpha: f64,
    learning_rate: Option<f64>,
    layer: Option<String>,
    optimizer: Option<Box<dyn Optimizer>>,
    terms: Vec<String>,
    /// The weights of the next step, `[terms]` in f64.
    current: Option<Var>,
    /// The weights the last step applied.
    applied: Vec<f64>,
    /// `L_i(0)`, from the first training step.
    initial: Option<Vec<f64>>,
    steps: u64,
}

impl Default for GradNorm {
    fn default() -> Self {
        Self::new()
    }
}

impl GradNorm {
    /// GradNorm with α = 1.5 (the paper's choice for most of its experiments).
    pub fn new() -> Self {
        Self {
            alpha: 1.5,
            learning_rate: None,
            layer: None,
            optimizer: None,
            terms: Vec::new(),
            current: None,
            applied: Vec::new(),
            initial: None,
            steps: 0,
        }
    }
    /// The asymmetry α (≥ 0): how strongly terms that lag behind are pulled up; 0 asks for
    /// equal gradient norms.
    pub fn alpha(mut self, alpha: f64) -> Self {
        self.alpha = alpha;
        self
    }
    /// The weights' learning rate (default: the model optimizer's at compile).
    pub fn learning_rate(mut self, lr: f64) -> Self {
        self.learning_rate = Some(lr);
        self
    }
    /// The layer whose weights `W` the gradient norms are taken at (default: the last layer
    /// every weighed term reaches).
    pub fn layer(mut self, name: impl Into<String>) -> Self {
        self.layer = Some(name.into());
        self
    }

    fn var(&self) -> Result<&Var> {
        self.current.as_ref().ok_or_else(|| {
            Error::State("loss weighting `gradnorm` is used before compile began it".into())
        })
    }

    fn current(&self) -> Result<Vec<f64>> {
        Ok(self.var()?.as_tensor().to_vec1::<f64>()?)
    }

    /// Which of `step.weights` are `W`.
    fn layer_weights(&self, step: &GradientStep<'_>) -> Result<Vec<bool>> {
        let layer_of = |w: &str| w.rsplit_once('/').map_or(w.to_string(), |(l, _)| l.into());
        let mut layers: Vec<String> = Vec::new();
        for w in step.weights {
            let l = layer_of(w);
            if !layers.contains(&l) {
                layers.push(l);
            }
        }
        let in_layer =
            |l: &str| -> Vec<bool> { step.weights.iter().map(|w| layer_of(w) == l).collect() };
        // A term reaches a layer when it depends on one of its weights (an L2 penalty on the
        // kernel alone reaches the layer; its gradient at the bias is 0).
        let reached_by = |keep: &[bool], term: usize| {
            keep.iter()
                .zip(&step.gradients[term])
                .any(|(k, g)| *k && g.is_some())
        };
        let reached_by_all = |keep: &[bool]| (0..step.gradients.len()).all(|t| reached_by(keep, t));
        let shared: Vec<&String> = layers
            .iter()
            .filter(|l| reached_by_all(&in_layer(l)))
            .collect();
        match &self.layer {
            None => match shared.last() {
                Some(l) => Ok(in_layer(l)),
                None => Err(Error::Compile(format!(
                    "loss weighting `gradnorm` needs a layer whose weights every term {:?} \
                     reaches, and the model has none: share a layer between the outputs",
                    self.terms
                ))),
            },
            Some(name) => {
                if !layers.contains(name) {
                    return Err(Error::Compile(format!(
                        "loss weighting `gradnorm`: layer `{name}` has no trainable weights in \
                         this model; the layers with trainable weights are {layers:?}"
                    )));
                }
                let keep = in_layer(name);
                if let Some(t) = (0..step.gradients.len()).find(|&t| !reached_by(&keep, t)) {
                    return Err(Error::Compile(format!(
                        "loss weighting `gradnorm`: term `{}` does not reach the weights of \
                         layer `{name}`; name a layer every term reaches: {shared:?}",
                        self.terms[t]
                    )));
                }
                Ok(keep)
            }
        }
    }
}

impl Strategy for GradNorm {
    fn name(&self) -> &str {
        "gradnorm"
    }
    fn validate(&self) -> Result<()> {
        if !(self.alpha.is_finite() && self.alpha >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "loss weighting `gradnorm`: alpha must be a finite number >= 0, got {}",
                self.alpha
            )));
        }
        if let Some(lr) = self.learning_rate {
            super::positive("gradnorm", "learning_rate", lr)?;
        }
        if self.layer.as_deref() == Some("") {
            return Err(Error::InvalidArgument(
                "loss weighting `gradnorm`: layer is empty: name a layer, or leave it out for \
                 the last shared one"
                    .into(),
            ));
        }
        Ok(())
    }
    fn adopt_optimizer(&mut self, optimizer: &dyn Optimizer) -> Result<()> {
        let mut own = optimizer.clone_optimizer();
        if let Some(lr) = self.learning_rate {
            own.set_learning_rate(lr);
        }
        self.optimizer = Some(own);
        Ok(())
    }
    fn begin(&mut self, terms: &[String], _dtype: DType, _device: &Device) -> Result<()> {
        let n = terms.len();
        self.terms = terms.to_vec();
        self.current = Some(Var::from_tensor(&Tensor::ones(
            n,
            DType::F64,
            &Device::Cpu,
        )?)?);
        self.applied = vec![1.0; n];
        self.initial = None;
        self.steps = 0;
        Ok(())
    }
    fn combine(&mut self, terms: &[Tensor]) -> Result<Tensor> {
        self.applied = self.current()?;
        weighted_sum(terms, &self.applied)
    }
    fn weights(&self) -> Result<Vec<f64>> {
        Ok(self.applied.clone())
    }
    fn combines_gradients(&self) -> bool {
        true
    }
    fn combine_gradients(
        &mut self,
        step: &GradientStep<'_>,
        advance: bool,
    ) -> Result<Vec<Option<Tensor>>> {
        let n = step.gradients.len();
        let layer = self.layer_weights(step)?;
        let gradient = scaled_sum(step.gradients, &self.applied, step.weights.len())?;
        if !advance {
            return Ok(gradient);
        }
        for (name, &l) in self.terms.iter().zip(step.values) {
            if !(l.is_finite() && l > 0.0) {
                return Err(Error::Data(format!(
                    "loss weighting `gradnorm`: term `{name}` is {l}, and GradNorm divides by \
                     each term's first value: it needs every term finite and > 0"
                )));
            }
        }
        let initial = self.initial.get_or_insert_with(|| step.values.to_vec());
        let ratio: Vec<f64> = step
            .values
            .iter()
            .zip(initial.iter())
            .map(|(l, l0)| l / l0)
            .collect();
        let mean_ratio = ratio.iter().sum::<f64>() / n as f64;
        let norms: Vec<f64> = (0..n)
            .map(|t| {
                let g = step.flat(t, &layer)?;
                Ok(super::dot(&g, &g).sqrt())
            })
            .collect::<Result<_>>()?;
        let w = &self.applied;
        let big_g: Vec<f64> = w.iter().zip(&norms).map(|(w, g)| w * g).collect();
        let mean_g = big_g.iter().sum::<f64>() / n as f64;
        // ∂/∂w_i Σ|G_j − target_j| = sign(G_i − target_i) · ‖∇_W L_i‖ (targets constant).
        let grad: Vec<f64> = (0..n)
            .map(|i| {
                let target = mean_g * (ratio[i] / mean_ratio).powf(self.alpha);
                let d = big_g[i] - target;
                let sign = if d > 0.0 {
                    1.0
                } else if d < 0.0 {
                    -1.0
                } else {
                    0.0
                };
                sign * norms[i]
            })
            .collect();
        let var = self.var()?.clone();
        let optimizer = self.optimizer.as_mut().ok_or_else(|| {
            Error::State("loss weighting `gradnorm` has no optimizer: compile gives it one".into())
        })?;
        self.steps += 1;
        let g = Tensor::from_vec(grad, n, &Device::Cpu)?;
        optimizer.update(std::slice::from_ref(&var), &[g], self.steps)?;
        let updated: Vec<f64> = var.as_tensor().to_vec1()?;
        let sum: f64 = updated.iter().sum();
        // As the paper, a weight may cross 0 (its L1 loss pulls it back); only a sum that
        // cannot be renormalized stops the run.
        if !(sum.is_finite() && sum > 0.0) {
            return Err(Error::Data(format!(
                "loss weighting `gradnorm`: the weights of {:?} became {updated:?} after step \
                 {}, which cannot be renormalized to sum to {n}: lower the strategy's \
                 learning_rate",
                self.terms, self.steps
            )));
        }
        let renormalized: Vec<f64> = updated.iter().map(|v| v * n as f64 / sum).collect();
        var.set(&Tensor::from_vec(renormalized, n, &Device::Cpu)?)?;
        Ok(gradient)
    }
    fn state(&self) -> serde_json::Value {
        let mut slots = serde_json::Map::new();
        if let (Some(opt), Some(var)) = (&self.optimizer, &self.current) {
            for (slot, id, value) in opt.state() {
                if id == var.as_tensor().id() {
                    if let Ok(v) = value.to_dtype(DType::F64).and_then(|v| v.to_vec1::<f64>()) {
                        slots.insert(slot, bits(&v));
                    }
                }
            }
        }
        serde_json::json!({
            "weights": bits(&self.current().unwrap_or_default()),
            "applied": bits(&self.applied),
            "initial": self.initial.as_ref().map(|v| bits(v)),
            "steps": self.steps,
            "optimizer": slots,
        })
    }
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        let n = self.terms.len();
        let current = from_bits(state, "gradnorm", "weights", n)?;
        self.applied = from_bits(state, "gradnorm", "applied", n)?;
        self.initial = match state.get("initial") {
            Some(serde_json::Value::Null) => None,
            _ => Some(from_bits(state, "gradnorm", "initial", n)?),
        };
        self.steps = state.get("steps").and_then(|s| s.as_u64()).ok_or_else(|| {
            Error::Data("the checkpoint's `gradnorm` loss weighting state has no `steps`".into())
        })?;
        let var = self.var()?.clone();
        var.set(&Tensor::from_vec(current, n, &Device::Cpu)?)?;
        let slots = state.get("optimizer").and_then(|s| s.as_object());
        if let (Some(slots), Some(opt)) = (slots, self.optimizer.as_mut()) {
            for slot in slots.keys() {
                let v = from_bits(&state["optimizer"], "gradnorm", slot, n)?;
                opt.set_state(slot, &var, Tensor::from_vec(v, n, &Device::Cpu)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optimizers::Sgd;

    /// One step by hand: two terms with gradients (3, 4) and (0, 1) at `W` (norms 5 and 1),
    /// equal losses (r = 1) and α = 0: targets Ḡ = 3, so w₀ goes down by lr · 5 and w₁ up
    /// by lr · 1, then both are renormalized to sum to 2; the model's gradient used w = 1.
    #[test]
    fn one_step_by_hand() {
        let mut s = GradNorm::new().alpha(0.0);
        s.adopt_optimizer(&Sgd::new(0.1)).unwrap();
        s.begin(&["a".into(), "b".into()], DType::F64, &Device::Cpu)
            .unwrap();
        let d = Device::Cpu;
        let t = |v: &[f64]| Some(Tensor::new(v, &d).unwrap());
        let gradients = vec![vec![t(&[3.0, 4.0]), t(&[1.0])], vec![t(&[0.0, 1.0]), None]];
        let names = ["trunk/kernel".to_string(), "a/kernel".to_string()];
        let terms = [
            Tensor::new(2.0f64, &d).unwrap(),
            Tensor::new(3.0f64, &d).unwrap(),
        ];
        s.combine(&terms).unwrap();
        let step = GradientStep {
            weights: &names,
            values: &[2.0, 3.0],
            gradients: &gradients,
            seed: 0,
        };
        let g = s.combine_gradients(&step, true).unwrap();
        let v = |t: &Option<Tensor>| t.as_ref().unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(v(&g[0]), [3.0, 5.0]);
        assert_eq!(v(&g[1]), [1.0]);
        // w = (1 - 0.5, 1 + 0.1) = (0.5, 1.1), renormalized: × 2 / 1.6.
        let w = s.current().unwrap();
        assert!(
            (w[0] - 0.625).abs() < 1e-12 && (w[1] - 1.375).abs() < 1e-12,
            "{w:?}"
        );
        assert_eq!(s.weights().unwrap(), [1.0, 1.0]);
        // The next step applies them; a state round trip keeps everything.
        s.combine(&terms).unwrap();
        let saved = s.state();
        let mut t2 = GradNorm::new().alpha(0.0);
        t2.adopt_optimizer(&Sgd::new(0.1)).unwrap();
        t2.begin(&["a".into(), "b".into()], DType::F64, &Device::Cpu)
            .unwrap();
        t2.load_state(&saved).unwrap();
        assert_eq!(t2.state(), saved);
        assert_eq!(t2.weights().unwrap(), s.weights().unwrap());
    }
}
