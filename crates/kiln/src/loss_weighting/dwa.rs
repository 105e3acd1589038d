//! Dynamic weight average (Liu, Johns and Davison 2019): each term's weight follows its rate
//! of descent over the last two epochs, `w = K · softmax(r / T)` with `r = L(t−1) / L(t−2)` the
//! ratio of its epoch means; weight 1 in the first two epochs.

use super::{bits, from_bits, positive, weighted_sum, Strategy};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// Dynamic weight average: weights from the ratio of each term's last two epoch means (means
/// over the epoch's samples, as the history reports them), softened by the temperature
/// (default 2, the paper's). Costs nothing per step beyond the terms.
///
/// ```
/// use kiln::loss_weighting::{DynamicWeightAverage, Strategy};
/// use kiln::prelude::*;
/// let mut s = DynamicWeightAverage::new().temperature(2.0);
/// s.begin(&["a_loss".into(), "b_loss".into()], DType::F64, &Device::Cpu)?;
/// for means in [[1.0, 1.0], [0.5, 1.0]] {
///     s.observe(&means, 1.0)?;
///     s.end_epoch()?;
/// }
/// // a halved, b stayed: r = (0.5, 1), w = 2·softmax(r / 2)
/// let w = s.weights()?;
/// let e = (0.25f64.exp(), 0.5f64.exp());
/// assert!((w[0] - 2.0 * e.0 / (e.0 + e.1)).abs() < 1e-12);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct DynamicWeightAverage {
    temperature: f64,
    terms: Vec<String>,
    weights: Vec<f64>,
    sums: Vec<f64>,
    samples: f64,
    /// The epoch means of the last two epochs, oldest first.
    means: Vec<Vec<f64>>,
}

impl Default for DynamicWeightAverage {
    fn default() -> Self {
        Self::new()
    }
}

impl DynamicWeightAverage {
    /// Temperature 2.
    pub fn new() -> Self {
        Self {
            temperature: 2.0,
            terms: Vec::new(),
            weights: Vec::new(),
            sums: Vec::new(),
            samples: 0.0,
            means: Vec::new(),
        }
    }
    /// The softmax temperature `T`: larger evens the weights out.
    pub fn temperature(mut self, t: f64) -> Self {
        self.temperature = t;
        self
    }
}

impl Strategy for DynamicWeightAverage {
    fn name(&self) -> &str {
        "dwa"
    }
    fn validate(&self) -> Result<()> {
        positive("dwa", "temperature", self.temperature)
    }
    fn begin(&mut self, terms: &[String], _dtype: DType, _device: &Device) -> Result<()> {
        self.terms = terms.to_vec();
        self.weights = vec![1.0; terms.len()];
        self.sums = vec![0.0; terms.len()];
        self.samples = 0.0;
        self.means.clear();
        Ok(())
    }
    fn combine(&mut self, terms: &[Tensor]) -> Result<Tensor> {
        weighted_sum(terms, &self.weights)
    }
    fn weights(&self) -> Result<Vec<f64>> {
        Ok(self.weights.clone())
    }
    fn observe(&mut self, terms: &[f64], samples: f64) -> Result<()> {
        for (s, v) in self.sums.iter_mut().zip(terms) {
            *s += v * samples;
        }
        self.samples += samples;
        Ok(())
    }
    fn end_epoch(&mut self) -> Result<()> {
        if self.samples == 0.0 {
            return Ok(());
        }
        let means: Vec<f64> = self.sums.iter().map(|s| s / self.samples).collect();
        self.sums.iter_mut().for_each(|s| *s = 0.0);
        self.samples = 0.0;
        self.means.push(means);
        if self.means.len() > 2 {
            self.means.remove(0);
        }
        if let [older, last] = &self.means[..] {
            let k = self.terms.len() as f64;
            let mut ratios = Vec::with_capacity(older.len());
            for ((term, a), b) in self.terms.iter().zip(last).zip(older) {
                let r = a / b;
                if !r.is_finite() {
                    return Err(Error::Data(format!(
                        "loss weighting `dwa`: term `{term}` had epoch means {b} then {a}, so \
                         its rate of descent {a}/{b} is not a finite number: DWA needs terms \
                         that stay finite and above 0"
                    )));
                }
                ratios.push(r / self.temperature);
            }
            let top = ratios.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let exps: Vec<f64> = ratios.iter().map(|r| (r - top).exp()).collect();
            let sum: f64 = exps.iter().sum();
            self.weights = exps.iter().map(|e| k * e / sum).collect();
        }
        Ok(())
    }
    fn state(&self) -> serde_json::Value {
        serde_json::json!({
            "weights": bits(&self.weights),
            "means": self.means.iter().map(|m| bits(m)).collect::<Vec<_>>(),
        })
    }
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        let n = self.terms.len();
        self.weights = from_bits(state, "dwa", "weights", n)?;
        let epochs = state
            .get("means")
            .and_then(|m| m.as_array())
            .map_or(0, Vec::len);
        self.means = (0..epochs.min(2))
            .map(|i| {
                let entry = serde_json::json!({ "m": state["means"][i] });
                from_bits(&entry, "dwa", "m", n)
            })
            .collect::<Result<_>>()?;
        Ok(())
    }
}
