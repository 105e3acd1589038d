//! Checkpoints: weights, optimizer state and training progress, enough to resume a run and end
//! with the same weights as a run that was never stopped.

use super::{improved, monitored, Callback, Control, Mode};
use crate::error::{Error, Result};
use crate::model::{History, Logs, Model};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What a checkpoint records besides tensors.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    /// Epochs completed; a resumed run starts at this epoch.
    pub epochs_done: usize,
    /// Optimizer steps taken.
    pub iterations: u64,
    /// The learning rate when it was saved.
    pub learning_rate: f64,
    /// The logs of the epochs completed.
    pub history: Vec<HashMap<String, f64>>,
    /// Each callback's state (in `Fit`'s callback order) when it was saved.
    #[serde(default)]
    pub callback_states: Vec<Option<serde_json::Value>>,
}

impl Model {
    /// Saves weights, optimizer state and progress as `<dir>/<stem>.safetensors` and
    /// `<dir>/<stem>.json` (each written to a temporary name, then renamed).
    pub fn save_checkpoint(
        &self,
        dir: &Path,
        stem: &str,
        epochs_done: usize,
        history: &History,
    ) -> Result<()> {
        let compiled = self
            .compiled
            .as_ref()
            .ok_or_else(crate::model::not_compiled)?;
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        let weights = self.weights();
        for w in &weights {
            tensors.insert(format!("weights/{}", w.name), w.var.as_tensor().detach());
        }
        for (slot, id, value) in compiled.optimizer.state() {
            let Some(w) = weights.iter().find(|w| w.var.as_tensor().id() == id) else {
                continue;
            };
            tensors.insert(format!("optimizer/{slot}/{}", w.name), value.detach());
        }
        let tensor_path = dir.join(format!("{stem}.safetensors"));
        crate::io::write_atomically(&tensor_path, |tmp| {
            Ok(candle_core::safetensors::save(&tensors, tmp)?)
        })?;
        let meta = Checkpoint {
            epochs_done,
            iterations: compiled.iterations,
            learning_rate: compiled.optimizer.learning_rate(),
            history: history
                .epochs
                .iter()
                .map(|l| l.iter().map(|(k, v)| (k.to_string(), v)).collect())
                .collect(),
            callback_states: self.callback_states.clone(),
        };
        let json_path = dir.join(format!("{stem}.json"));
        let text = serde_json::to_string_pretty(&meta).map_err(|e| Error::Data(e.to_string()))?;
        crate::io::write_atomically(&json_path, |tmp| {
            std::fs::write(tmp, text).map_err(|source| Error::Io {
                path: tmp.to_path_buf(),
                source,
            })
        })
    }

    /// Restores a checkpoint written by [`Model::save_checkpoint`] into this (compiled) model.
    pub fn load_checkpoint(&mut self, dir: &Path, stem: &str) -> Result<Checkpoint> {
        let json_path = dir.join(format!("{stem}.json"));
        let text = std::fs::read_to_string(&json_path).map_err(|source| Error::Io {
            path: json_path.clone(),
            source,
        })?;
        let meta: Checkpoint = serde_json::from_str(&text).map_err(|e| {
            Error::Data(format!(
                "{}: not a kiln checkpoint: {e}",
                json_path.display()
            ))
        })?;
        let tensor_path = dir.join(format!("{stem}.safetensors"));
        let tensors = candle_core::safetensors::load(&tensor_path, self.device()).map_err(|e| {
            Error::Data(format!(
                "{}: cannot read checkpoint: {e}",
                tensor_path.display()
            ))
        })?;
        let weights = self.weights();
        for w in &weights {
            let t = tensors.get(&format!("weights/{}", w.name)).ok_or_else(|| {
                Error::Data(format!(
                    "{}: no weight `{}`: the checkpoint is from another model",
                    tensor_path.display(),
                    w.name
                ))
            })?;
            if t.dims() != w.var.dims() {
                return Err(Error::Data(format!(
                    "{}: weight `{}` has shape {:?}, the model's has {:?}",
                    tensor_path.display(),
                    w.name,
                    t.dims(),
                    w.var.dims()
                )));
            }
            w.var.set(&t.to_dtype(self.dtype())?)?;
        }
        let compiled = self
            .compiled
            .as_mut()
            .ok_or_else(crate::model::not_compiled)?;
        for (key, value) in &tensors {
            let Some(rest) = key.strip_prefix("optimizer/") else {
                continue;
            };
            let Some((slot, name)) = rest.split_once('/') else {
                continue;
            };
            if let Some(w) = weights.iter().find(|w| w.name == name) {
                compiled.optimizer.set_state(slot, &w.var, value.clone())?;
            }
        }
        compiled.iterations = meta.iterations;
        compiled.optimizer.set_learning_rate(meta.learning_rate);
        Ok(meta)
    }
}

impl Checkpoint {
    /// The saved history as [`History`] (keys in alphabetical order).
    pub fn history(&self) -> History {
        let mut h = History::default();
        for epoch in &self.history {
            let mut logs = Logs::default();
            let mut keys: Vec<&String> = epoch.keys().collect();
            keys.sort();
            for k in keys {
                logs.set(k.clone(), epoch[k]);
            }
            h.epochs.push(logs);
        }
        h
    }
}

/// Saves a checkpoint after every epoch (`last`), and the best one so far (`best`) when
/// monitoring.
///
/// ```
/// let cb = kiln::callbacks::ModelCheckpoint::new("runs/ckpt").save_best("val_loss");
/// ```
pub struct ModelCheckpoint {
    dir: PathBuf,
    monitor: Option<String>,
    mode: Mode,
    best: Option<f64>,
    history: History,
}

impl ModelCheckpoint {
    /// Writes `last.safetensors`/`last.json` into `dir` after every epoch.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            monitor: None,
            mode: Mode::Auto,
            best: None,
            history: History::default(),
        }
    }
    /// Also keeps `best.*`, the checkpoint of the best epoch by `monitor`.
    pub fn save_best(mut self, monitor: impl Into<String>) -> Self {
        self.monitor = Some(monitor.into());
        self
    }
    /// Whether smaller or larger is better for the monitored value.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }
    /// Continues a history restored from a checkpoint (for resumed runs).
    pub fn resuming(mut self, history: History) -> Self {
        self.history = history;
        self
    }
}

impl Callback for ModelCheckpoint {
    fn state(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({ "best": self.best }))
    }
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        self.best = super::state_field(state, "best", "ModelCheckpoint")?;
        Ok(())
    }
    fn on_epoch_end(
        &mut self,
        epoch: usize,
        logs: &mut Logs,
        model: &mut Model,
    ) -> Result<Control> {
        self.history.epochs.push(logs.clone());
        let done = epoch + 1;
        model.save_checkpoint(&self.dir, "last", done, &self.history)?;
        if let Some(monitor) = &self.monitor {
            let current = monitored(logs, monitor, "ModelCheckpoint")?;
            if self
                .best
                .is_none_or(|b| improved(current, b, 0.0, self.mode.larger_is_better(monitor)))
            {
                self.best = Some(current);
                model.save_checkpoint(&self.dir, "best", done, &self.history)?;
            }
        }
        Ok(Control::Continue)
    }
}
