//! Callbacks: code that runs at the edges of epochs and batches during `fit` — early stopping,
//! checkpoints, learning-rate schedules and plateaus, NaN guards, CSV logs.

pub(crate) mod checkpoint;
mod schedules;

pub use checkpoint::{Checkpoint, ModelCheckpoint};
pub use schedules::{LearningRateScheduler, ReduceLROnPlateau, Schedule};

use crate::error::{Error, Result};
use crate::model::{Logs, Model};
use std::path::PathBuf;

/// Whether training goes on after a callback has run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Keep training.
    Continue,
    /// Stop after this batch or epoch.
    Stop,
}

/// Hooks into `fit`. Every method has a do-nothing default.
pub trait Callback: Send {
    /// Before the first epoch.
    fn on_train_begin(&mut self, _model: &mut Model) -> Result<()> {
        Ok(())
    }
    /// Before each epoch (0-based).
    fn on_epoch_begin(&mut self, _epoch: usize, _model: &mut Model) -> Result<()> {
        Ok(())
    }
    /// After each batch, with the epoch's running logs and the batch's own total loss.
    fn on_batch_end(&mut self, _batch: usize, _batch_loss: f64, _logs: &Logs) -> Result<Control> {
        Ok(Control::Continue)
    }
    /// After each epoch, with its logs (validation included). A callback may add entries
    /// (such as `learning_rate`, as Keras 3's learning-rate callbacks do).
    fn on_epoch_end(
        &mut self,
        _epoch: usize,
        _logs: &mut Logs,
        _model: &mut Model,
    ) -> Result<Control> {
        Ok(Control::Continue)
    }
    /// After the last epoch, or after a callback stopped training.
    fn on_train_end(&mut self, _model: &mut Model) -> Result<()> {
        Ok(())
    }
    /// What a checkpoint must keep of this callback (counters, best values) so that a resumed
    /// run continues exactly as an unbroken one.
    fn state(&self) -> Option<serde_json::Value> {
        None
    }
    /// Restores what [`Callback::state`] returned; called after `on_train_begin` on resume.
    fn load_state(&mut self, _state: &serde_json::Value) -> Result<()> {
        Ok(())
    }
    /// Tensors a checkpoint must keep of this callback (such as the best weights seen), by
    /// name.
    fn tensor_state(&self) -> Vec<(String, candle_core::Tensor)> {
        Vec::new()
    }
    /// Restores what [`Callback::tensor_state`] returned; called after `load_state`.
    fn load_tensor_state(&mut self, _tensors: &[(String, candle_core::Tensor)]) -> Result<()> {
        Ok(())
    }
}

/// Reads a field of a saved callback state.
pub(crate) fn state_field<T: serde::de::DeserializeOwned>(
    state: &serde_json::Value,
    key: &str,
    who: &str,
) -> Result<T> {
    serde_json::from_value(state.get(key).cloned().unwrap_or(serde_json::Value::Null)).map_err(
        |e| {
            Error::Data(format!(
                "{who}: checkpointed state `{key}` cannot be read: {e}"
            ))
        },
    )
}

/// Whether a smaller or a larger monitored value is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Larger is better for accuracy-like names, smaller otherwise (Keras' `auto`).
    Auto,
    /// Smaller is better.
    Min,
    /// Larger is better.
    Max,
}

impl Mode {
    pub(crate) fn larger_is_better(self, monitor: &str) -> bool {
        match self {
            Mode::Min => false,
            Mode::Max => true,
            Mode::Auto => monitor.contains("acc") || monitor.starts_with("fmeasure"),
        }
    }
}

/// Reads the monitored value, or explains which names exist.
pub(crate) fn monitored(logs: &Logs, monitor: &str, who: &str) -> Result<f64> {
    logs.get(monitor).ok_or_else(|| {
        Error::State(format!(
            "{who} monitors `{monitor}`, which is not in the logs {:?}: monitor one of those \
             (val_ names need validation data)",
            logs.keys().collect::<Vec<_>>()
        ))
    })
}

fn improved(current: f64, best: f64, min_delta: f64, larger: bool) -> bool {
    if larger {
        current - min_delta > best
    } else {
        current + min_delta < best
    }
}

/// Stops training when a monitored value has stopped improving, optionally restoring the best
/// weights seen.
///
/// ```
/// use kiln::callbacks::EarlyStopping;
/// let stop = EarlyStopping::new("val_loss").patience(3).restore_best_weights(true);
/// ```
pub struct EarlyStopping {
    monitor: String,
    min_delta: f64,
    patience: usize,
    mode: Mode,
    restore_best_weights: bool,
    best: Option<f64>,
    wait: usize,
    best_weights: Option<Vec<candle_core::Tensor>>,
    /// The epoch training stopped at, if it stopped early.
    pub stopped_epoch: Option<usize>,
}

impl EarlyStopping {
    /// Watches `monitor` (such as `val_loss`) with patience 0.
    pub fn new(monitor: impl Into<String>) -> Self {
        Self {
            monitor: monitor.into(),
            min_delta: 0.0,
            patience: 0,
            mode: Mode::Auto,
            restore_best_weights: false,
            best: None,
            wait: 0,
            best_weights: None,
            stopped_epoch: None,
        }
    }
    /// Epochs without improvement after which training stops (Keras' `patience`: with 2,
    /// two epochs in a row no better than the best stop it; 0 stops at the first, as 1 does).
    pub fn patience(mut self, patience: usize) -> Self {
        self.patience = patience;
        self
    }
    /// The smallest change that counts as an improvement.
    pub fn min_delta(mut self, min_delta: f64) -> Self {
        self.min_delta = min_delta.abs();
        self
    }
    /// Whether smaller or larger is better.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }
    /// Restore the weights of the best epoch when training ends (stopped early or not), as
    /// Keras 3 does.
    pub fn restore_best_weights(mut self, on: bool) -> Self {
        self.restore_best_weights = on;
        self
    }
}

pub(crate) fn snapshot(model: &Model) -> Result<Vec<candle_core::Tensor>> {
    model
        .weights()
        .iter()
        .map(|w| Ok(w.var.as_tensor().copy()?))
        .collect()
}

pub(crate) fn restore(model: &Model, values: &[candle_core::Tensor]) -> Result<()> {
    for (w, v) in model.weights().iter().zip(values) {
        w.var.set(v)?;
    }
    Ok(())
}

impl Callback for EarlyStopping {
    fn state(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({ "best": self.best, "wait": self.wait }))
    }
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        self.best = state_field(state, "best", "EarlyStopping")?;
        self.wait = state_field(state, "wait", "EarlyStopping")?;
        Ok(())
    }
    fn tensor_state(&self) -> Vec<(String, candle_core::Tensor)> {
        self.best_weights
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, t)| (format!("best_weights/{i}"), t.clone()))
            .collect()
    }
    fn load_tensor_state(&mut self, tensors: &[(String, candle_core::Tensor)]) -> Result<()> {
        let mut best = Vec::new();
        for i in 0..tensors.len() {
            let name = format!("best_weights/{i}");
            let t = tensors.iter().find(|(n, _)| *n == name).ok_or_else(|| {
                Error::State(format!(
                    "EarlyStopping: the checkpoint's best weights lack `{name}`"
                ))
            })?;
            best.push(t.1.clone());
        }
        self.best_weights = (!best.is_empty()).then_some(best);
        Ok(())
    }
    fn on_train_begin(&mut self, _model: &mut Model) -> Result<()> {
        self.best = None;
        self.wait = 0;
        self.stopped_epoch = None;
        self.best_weights = None;
        Ok(())
    }
    fn on_epoch_end(
        &mut self,
        epoch: usize,
        logs: &mut Logs,
        model: &mut Model,
    ) -> Result<Control> {
        let current = monitored(logs, &self.monitor, "EarlyStopping")?;
        let larger = self.mode.larger_is_better(&self.monitor);
        if self
            .best
            .is_none_or(|b| improved(current, b, self.min_delta, larger))
        {
            self.best = Some(current);
            self.wait = 0;
            if self.restore_best_weights {
                self.best_weights = Some(snapshot(model)?);
            }
            return Ok(Control::Continue);
        }
        // Keras 3 counts this epoch before comparing, and never stops after the first epoch:
        // `patience` epochs without improvement stop training (0 and 1 alike).
        self.wait += 1;
        if self.wait >= self.patience && epoch > 0 {
            self.stopped_epoch = Some(epoch);
            return Ok(Control::Stop);
        }
        Ok(Control::Continue)
    }
    fn on_train_end(&mut self, model: &mut Model) -> Result<()> {
        // As Keras 3: the best weights come back at the end of training, whether it stopped
        // early or ran all its epochs.
        if let Some(best) = &self.best_weights {
            restore(model, best)?;
        }
        Ok(())
    }
}

/// Stops training as soon as a batch's loss is NaN or infinite.
///
/// ```
/// let guard = kiln::callbacks::TerminateOnNaN::default();
/// ```
#[derive(Debug, Default)]
pub struct TerminateOnNaN {
    /// The batch at which a non-finite loss was seen.
    pub stopped_at_batch: Option<usize>,
}

impl Callback for TerminateOnNaN {
    fn on_batch_end(&mut self, batch: usize, batch_loss: f64, _logs: &Logs) -> Result<Control> {
        if !batch_loss.is_finite() {
            eprintln!("batch {batch}: loss is {batch_loss}, terminating training");
            self.stopped_at_batch = Some(batch);
            return Ok(Control::Stop);
        }
        Ok(Control::Continue)
    }
}

/// Writes the logs of every epoch to a CSV file (rewritten atomically after each epoch).
///
/// ```
/// let log = kiln::callbacks::CsvLogger::new("runs/history.csv");
/// ```
pub struct CsvLogger {
    path: PathBuf,
    rows: Vec<Logs>,
}

impl CsvLogger {
    /// Logs to `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            rows: Vec::new(),
        }
    }
}

/// Writes epochs' logs as CSV: an `epoch` column, then every name that appears, in order.
pub fn write_history_csv(
    path: &std::path::Path,
    epochs: &[Logs],
    first_epoch: usize,
) -> Result<()> {
    let mut columns: Vec<String> = Vec::new();
    for logs in epochs {
        for k in logs.keys() {
            if !columns.iter().any(|c| c == k) {
                columns.push(k.to_string());
            }
        }
    }
    crate::io::write_atomically(path, |tmp| {
        let io = |e: csv::Error| Error::Data(format!("{}: {e}", path.display()));
        let mut w = csv::Writer::from_path(tmp).map_err(io)?;
        let mut header = vec!["epoch".to_string()];
        header.extend(columns.iter().cloned());
        w.write_record(&header).map_err(io)?;
        for (i, logs) in epochs.iter().enumerate() {
            let mut row = vec![(first_epoch + i).to_string()];
            row.extend(
                columns
                    .iter()
                    .map(|c| logs.get(c).map(|v| v.to_string()).unwrap_or_default()),
            );
            w.write_record(&row).map_err(io)?;
        }
        w.flush().map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    })
}

impl Callback for CsvLogger {
    fn on_epoch_end(
        &mut self,
        _epoch: usize,
        logs: &mut Logs,
        _model: &mut Model,
    ) -> Result<Control> {
        self.rows.push(logs.clone());
        write_history_csv(&self.path, &self.rows, 0)?;
        Ok(Control::Continue)
    }
}
