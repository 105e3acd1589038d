//! Uncertainty weighting (Kendall, Gal and Cipolla 2018): each term gets a learned
//! log-variance `s = log σ²`, and the objective is `Σ ½·exp(−s)·L + ½·s`, so a term's weight
//! `½·exp(−s)` falls as its loss stays high. The `s` are trained by the model's optimizer.

use super::{bits, from_bits, Strategy};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};

/// Uncertainty weighting: learned log-variances `s`, objective `Σ ½·exp(−s)·L + ½·s` (the form
/// LibMTL uses, ½ for every term), each `s` starting at [`Uncertainty::initial_log_var`]
/// (default 0: weight ½) and trained by the model's optimizer, with its learning rate and
/// clipping. Costs nothing per step beyond the terms.
///
/// ```
/// use kiln::loss_weighting::{Strategy, Uncertainty};
/// use kiln::prelude::*;
/// let mut s = Uncertainty::new();
/// s.begin(&["a_loss".into(), "b_loss".into()], DType::F64, &Device::Cpu)?;
/// assert_eq!(s.weights()?, vec![0.5, 0.5]);
/// let terms = [Tensor::new(2.0f64, &Device::Cpu)?, Tensor::new(4.0f64, &Device::Cpu)?];
/// let objective = s.combine(&terms)?.to_scalar::<f64>()?;
/// assert_eq!(objective, 3.0); // ½·2 + ½·4 + 0
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct Uncertainty {
    initial: f64,
    log_vars: Vec<(String, Var)>,
    /// `½·exp(−s)` as the last step used it.
    last: Vec<f64>,
}

impl Uncertainty {
    /// Log-variances starting at 0.
    pub fn new() -> Self {
        Self::default()
    }
    /// The log-variance every term starts from (weight `½·exp(−s)`).
    pub fn initial_log_var(mut self, s: f64) -> Self {
        self.initial = s;
        self
    }
}

impl Strategy for Uncertainty {
    fn name(&self) -> &str {
        "uncertainty"
    }
    fn validate(&self) -> Result<()> {
        if self.initial.is_finite() {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "loss weighting `uncertainty`: initial_log_var must be a finite number, got {}",
                self.initial
            )))
        }
    }
    fn begin(&mut self, terms: &[String], dtype: DType, device: &Device) -> Result<()> {
        self.log_vars = terms
            .iter()
            .map(|t| {
                let s = Tensor::new(self.initial, device)?.to_dtype(dtype)?;
                Ok((format!("log_var/{t}"), Var::from_tensor(&s)?))
            })
            .collect::<Result<_>>()?;
        self.last = vec![0.5 * (-self.initial).exp(); terms.len()];
        Ok(())
    }
    fn variables(&self) -> Vec<(String, Var)> {
        self.log_vars.clone()
    }
    fn combine(&mut self, terms: &[Tensor]) -> Result<Tensor> {
        let mut total: Option<Tensor> = None;
        self.last.clear();
        for (term, (_, s)) in terms.iter().zip(&self.log_vars) {
            self.last.push(0.5 * (-super::value(s.as_tensor())?).exp());
            let s = s.as_tensor();
            let weight = (s.neg()?.exp()? * 0.5)?;
            let part = ((weight * term.reshape(())?)? + (s * 0.5)?)?;
            total = Some(match total.take() {
                Some(acc) => (acc + part)?,
                None => part,
            });
        }
        total.ok_or_else(|| Error::Compile("uncertainty got no terms".into()))
    }
    fn weights(&self) -> Result<Vec<f64>> {
        Ok(self.last.clone())
    }
    fn state(&self) -> serde_json::Value {
        serde_json::json!({ "weights": bits(&self.last) })
    }
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        self.last = from_bits(state, "uncertainty", "weights", self.log_vars.len())?;
        Ok(())
    }
}
