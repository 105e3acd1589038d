//! Logs and history: every term and metric by name, per epoch.

use crate::metrics::Metric;
use serde::ser::SerializeMap;
use std::collections::BTreeMap;

/// Named values in a fixed order: `loss`, per-output losses, added terms, metrics, then their
/// `val_` twins.
///
/// ```
/// let mut logs = kiln::Logs::default();
/// logs.set("loss", 0.5);
/// assert_eq!(logs.get("loss"), Some(0.5));
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Logs(Vec<(String, f64)>);

impl Logs {
    /// The value named `key`.
    pub fn get(&self, key: &str) -> Option<f64> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }
    /// Sets (or replaces) a value, keeping the order of first insertion.
    pub fn set(&mut self, key: impl Into<String>, value: f64) {
        let key = key.into();
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key, value)),
        }
    }
    /// The names, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| k.as_str())
    }
    /// Name and value pairs, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, f64)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }
    /// `name: value` pairs joined for a progress line, each value as Keras' progress bar
    /// writes it (scientific notation at 1e-3 and below); `epoch_time_s` is left out.
    ///
    /// ```
    /// let mut logs = kiln::Logs::default();
    /// logs.set("loss", 0.25);
    /// logs.set("l2", 0.000321);
    /// logs.set("epoch_time_s", 0.4);
    /// assert_eq!(logs.summary(), "loss: 0.2500 - l2: 3.2100e-04");
    /// ```
    pub fn summary(&self) -> String {
        super::progress::format_logs(self)
    }
}

impl serde::Serialize for Logs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// What `fit` returns: the logs of every epoch. Besides the terms and metrics, each epoch
/// records `epoch_time_s`, the seconds its training and validation took (not its callbacks).
///
/// ```
/// let mut h = kiln::History::default();
/// let mut logs = kiln::Logs::default();
/// logs.set("loss", 1.0);
/// h.epochs.push(logs);
/// assert_eq!(h.get("loss"), Some(vec![1.0]));
/// ```
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct History {
    /// One [`Logs`] per epoch.
    pub epochs: Vec<Logs>,
}

impl History {
    /// The series of one value over the epochs, as Keras' `history.history[key]`.
    pub fn get(&self, key: &str) -> Option<Vec<f64>> {
        self.epochs.iter().map(|l| l.get(key)).collect()
    }
    /// The last epoch's logs.
    pub fn last(&self) -> Option<&Logs> {
        self.epochs.last()
    }
    /// The number of epochs trained (fewer than asked for when a callback stopped early).
    ///
    /// ```
    /// let mut h = kiln::History::default();
    /// assert!(h.is_empty());
    /// h.epochs.push(kiln::Logs::default());
    /// assert_eq!(h.len(), 1);
    /// ```
    pub fn len(&self) -> usize {
        self.epochs.len()
    }
    /// Whether no epoch was trained (`epochs(0)`, or a run resumed after its last epoch).
    pub fn is_empty(&self) -> bool {
        self.epochs.is_empty()
    }
    /// The history without the series `key`: e.g. `without("epoch_time_s")` to compare two
    /// runs, whose epoch durations always differ.
    ///
    /// ```
    /// let mut h = kiln::History::default();
    /// let mut logs = kiln::Logs::default();
    /// logs.set("loss", 1.0);
    /// logs.set("epoch_time_s", 0.25);
    /// h.epochs.push(logs);
    /// let h = h.without("epoch_time_s");
    /// assert_eq!(h.epochs[0].keys().collect::<Vec<_>>(), ["loss"]);
    /// ```
    pub fn without(&self, key: &str) -> History {
        History {
            epochs: self
                .epochs
                .iter()
                .map(|l| Logs(l.0.iter().filter(|(k, _)| k != key).cloned().collect()))
                .collect(),
        }
    }
    /// Every series by name.
    pub fn series(&self) -> BTreeMap<String, Vec<f64>> {
        let mut out: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for logs in &self.epochs {
            for (k, v) in logs.iter() {
                out.entry(k.to_string()).or_default().push(v);
            }
        }
        out
    }
}

/// What an epoch accumulates: running means of the loss terms, weighted by sample count
/// (Keras' `Mean` metric), and the streaming state of every metric.
#[derive(Default)]
pub(crate) struct Accumulator {
    means: Vec<(String, f64, f64)>,
    metrics: Vec<(String, Box<dyn Metric>)>,
    /// Running means logged after the metrics (gradient diagnostics).
    diagnostics: Vec<(String, f64, f64)>,
}

fn add_to(means: &mut Vec<(String, f64, f64)>, key: &str, total: f64, count: f64) {
    match means.iter_mut().find(|(k, _, _)| k == key) {
        Some(slot) => {
            slot.1 += total;
            slot.2 += count;
        }
        None => means.push((key.to_string(), total, count)),
    }
}

impl Accumulator {
    pub(crate) fn add(&mut self, key: &str, total: f64, count: f64) {
        add_to(&mut self.means, key, total, count);
    }
    /// As [`Accumulator::add`], for a value logged after the metrics.
    pub(crate) fn add_diagnostic(&mut self, key: &str, total: f64, count: f64) {
        add_to(&mut self.diagnostics, key, total, count);
    }
    /// The epoch state of the metric logged as `key`, made from `metric` on first use.
    pub(crate) fn metric(&mut self, key: &str, metric: &dyn Metric) -> &mut dyn Metric {
        let i = match self.metrics.iter().position(|(k, _)| k == key) {
            Some(i) => i,
            None => {
                self.metrics.push((key.to_string(), metric.fresh()));
                self.metrics.len() - 1
            }
        };
        self.metrics[i].1.as_mut()
    }
    /// The epoch's metrics, by log name (distributed training sums their states).
    pub(crate) fn metrics_mut(&mut self) -> &mut [(String, Box<dyn Metric>)] {
        &mut self.metrics
    }
    pub(crate) fn logs(&self, prefix: &str) -> Logs {
        let mut logs = Logs::default();
        let mean = |total: f64, count: f64| if count == 0.0 { 0.0 } else { total / count };
        for (k, total, count) in &self.means {
            logs.set(format!("{prefix}{k}"), mean(*total, *count));
        }
        for (k, metric) in &self.metrics {
            match metric.result().as_slice() {
                [one] => logs.set(format!("{prefix}{k}"), *one),
                many => {
                    for (i, v) in many.iter().enumerate() {
                        logs.set(format!("{prefix}{k}_{i}"), *v);
                    }
                }
            }
        }
        for (k, total, count) in &self.diagnostics {
            logs.set(format!("{prefix}{k}"), mean(*total, *count));
        }
        logs
    }
}
