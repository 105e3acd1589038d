//! FAMO (Liu, Liu, Jin, Stone and Liu 2023, "Fast Adaptive Multitask Optimization"): the step
//! follows `Σ z_i · ∇log L_i` with `z = softmax(ξ)`, normalized by `c = Σ z_i / L_i`, so each
//! term's gradient has weight `z_i / (c · L_i)`; after the update, the task logits `ξ` take one
//! Adam step (with L2 decay γ) along `J_softmaxᵀ · δ`, where `δ_i = log L_i(before) − log
//! L_i(after)` on the same batch, which raises the weight of terms that fell least.

use super::{bits, from_bits, positive, value, weighted_sum, Strategy};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// FAMO: O(1) space and time in the number of terms (no per-term gradients): one more forward
/// pass per step, on the same batch after the update, in inference mode (no dropout, no
/// batch-statistics update). Defaults as the official implementation: logits' learning rate
/// 0.025, decay γ = 1e-5, Adam β = (0.9, 0.999), ε = 1e-8; terms shifted by 1e-8 before their
/// logarithm. It needs terms > 0 (losses, not rewards). The official code also clips the model
/// gradient to norm 1: here that is the optimizer's own `clipnorm`, if you set it.
///
/// ```
/// use kiln::loss_weighting::{Famo, Strategy};
/// use kiln::prelude::*;
/// let mut s = Famo::new();
/// s.begin(&["a_loss".into(), "b_loss".into()], DType::F64, &Device::Cpu)?;
/// let terms = [Tensor::new(1.0f64, &Device::Cpu)?, Tensor::new(3.0f64, &Device::Cpu)?];
/// s.combine(&terms)?;
/// let w = s.weights()?; // z = (½, ½): weights z_i / (c·L_i), ∝ 1/L, summing to 1
/// assert!((w[0] + w[1] - 1.0).abs() < 1e-12);
/// assert!((w[0] / w[1] - 3.0).abs() < 1e-6);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Famo {
    learning_rate: f64,
    gamma: f64,
    beta_1: f64,
    beta_2: f64,
    epsilon: f64,
    terms: Vec<String>,
    logits: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
    steps: u64,
    /// The terms of the current step, before its update.
    before: Vec<f64>,
    weights: Vec<f64>,
}

/// The shift FAMO adds to every term before its logarithm.
const SHIFT: f64 = 1e-8;

impl Default for Famo {
    fn default() -> Self {
        Self::new()
    }
}

impl Famo {
    /// The official defaults.
    pub fn new() -> Self {
        Self {
            learning_rate: 0.025,
            gamma: 1e-5,
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-8,
            terms: Vec::new(),
            logits: Vec::new(),
            m: Vec::new(),
            v: Vec::new(),
            steps: 0,
            before: Vec::new(),
            weights: Vec::new(),
        }
    }
    /// The learning rate of the task logits' Adam (default 0.025).
    pub fn learning_rate(mut self, lr: f64) -> Self {
        self.learning_rate = lr;
        self
    }
    /// The L2 decay of the task logits, γ (default 1e-5).
    pub fn gamma(mut self, gamma: f64) -> Self {
        self.gamma = gamma;
        self
    }

    /// softmax(ξ).
    fn z(&self) -> Vec<f64> {
        let top = self
            .logits
            .iter()
            .cloned()
            .fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = self.logits.iter().map(|l| (l - top).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    }

    fn shifted(&self, terms: &[f64]) -> Result<Vec<f64>> {
        self.terms
            .iter()
            .zip(terms)
            .map(|(name, &l)| {
                let d = l + SHIFT;
                if d > 0.0 && d.is_finite() {
                    Ok(d)
                } else {
                    Err(Error::Data(format!(
                        "loss weighting `famo`: term `{name}` is {l}, and FAMO weighs terms by \
                         their logarithm: it needs every term finite and > 0"
                    )))
                }
            })
            .collect()
    }
}

impl Strategy for Famo {
    fn name(&self) -> &str {
        "famo"
    }
    fn validate(&self) -> Result<()> {
        positive("famo", "learning_rate", self.learning_rate)?;
        if !(self.gamma.is_finite() && self.gamma >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "loss weighting `famo`: gamma must be a finite number >= 0, got {}",
                self.gamma
            )));
        }
        Ok(())
    }
    fn begin(&mut self, terms: &[String], _dtype: DType, _device: &Device) -> Result<()> {
        let n = terms.len();
        self.terms = terms.to_vec();
        self.logits = vec![0.0; n];
        self.m = vec![0.0; n];
        self.v = vec![0.0; n];
        self.steps = 0;
        self.before.clear();
        self.weights = vec![1.0 / n as f64; n];
        Ok(())
    }
    fn combine(&mut self, terms: &[Tensor]) -> Result<Tensor> {
        let values: Vec<f64> = terms.iter().map(value).collect::<Result<_>>()?;
        let d = self.shifted(&values)?;
        let z = self.z();
        let c: f64 = z.iter().zip(&d).map(|(z, d)| z / d).sum();
        // ∇ Σ (z_i / c)·log(L_i + 1e-8) = Σ z_i / (c·(L_i + 1e-8)) · ∇L_i.
        self.weights = z.iter().zip(&d).map(|(z, d)| z / (c * d)).collect();
        self.before = values;
        weighted_sum(terms, &self.weights)
    }
    fn weights(&self) -> Result<Vec<f64>> {
        Ok(self.weights.clone())
    }
    fn needs_terms_after_update(&self) -> bool {
        true
    }
    fn after_update(&mut self, terms: &[f64]) -> Result<()> {
        let before = self.shifted(&self.before)?;
        let after = self.shifted(terms)?;
        let delta: Vec<f64> = before
            .iter()
            .zip(&after)
            .map(|(b, a)| b.ln() - a.ln())
            .collect();
        let z = self.z();
        let mean: f64 = z.iter().zip(&delta).map(|(z, d)| z * d).sum();
        self.steps += 1;
        let t = self.steps as i32;
        let (b1, b2) = (self.beta_1, self.beta_2);
        for i in 0..z.len() {
            // Jᵀδ of the softmax, plus the L2 decay, then Adam as torch writes it.
            let g = z[i] * (delta[i] - mean) + self.gamma * self.logits[i];
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g;
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g * g;
            let m_hat = self.m[i] / (1.0 - b1.powi(t));
            let v_hat = self.v[i] / (1.0 - b2.powi(t));
            self.logits[i] -= self.learning_rate * m_hat / (v_hat.sqrt() + self.epsilon);
        }
        Ok(())
    }
    fn state(&self) -> serde_json::Value {
        serde_json::json!({
            "logits": bits(&self.logits),
            "m": bits(&self.m),
            "v": bits(&self.v),
            "steps": self.steps,
            "weights": bits(&self.weights),
        })
    }
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        let n = self.terms.len();
        self.logits = from_bits(state, "famo", "logits", n)?;
        self.m = from_bits(state, "famo", "m", n)?;
        self.v = from_bits(state, "famo", "v", n)?;
        self.weights = from_bits(state, "famo", "weights", n)?;
        self.steps = state.get("steps").and_then(|s| s.as_u64()).ok_or_else(|| {
            Error::Data("the checkpoint's `famo` loss weighting state has no `steps`".into())
        })?;
        Ok(())
    }
}
