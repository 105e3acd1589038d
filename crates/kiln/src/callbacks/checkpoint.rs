//! Checkpoints: weights, optimizer state and training progress, enough to resume a run and end
//! with the same weights as a run that was never stopped.

use super::{improved, monitored, Callback, Control, Mode};
use crate::error::{Error, Result};
use crate::model::{History, Logs, Model};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What a checkpoint records besides tensors. It travels inside the checkpoint's one
/// safetensors file (in its header's metadata), so weights, optimizer state, progress and
/// callback state are committed together by a single rename: a checkpoint is never torn.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    /// Epochs completed; a resumed run starts at this epoch.
    pub epochs_done: usize,
    /// Optimizer steps taken.
    pub iterations: u64,
    /// The learning rate when it was saved.
    pub learning_rate: f64,
    /// The logs of the epochs completed, each in its original order.
    pub history: Vec<Vec<(String, f64)>>,
    /// Each callback's state (in `Fit`'s callback order) when it was saved.
    #[serde(default)]
    pub callback_states: Vec<Option<serde_json::Value>>,
    /// Whether a callback (early stopping) had stopped training when this was saved: resuming
    /// it trains no further epochs.
    #[serde(default)]
    pub stopped: bool,
    /// What the run was (its configuration and data), when a run file trained it: resuming
    /// with another run is refused.
    #[serde(default)]
    pub run: Option<serde_json::Value>,
    /// Each callback's tensors (such as early stopping's best weights), in `Fit`'s callback
    /// order; give them to [`crate::Fit::callback_tensor_states`] with the states.
    #[serde(skip)]
    pub callback_tensors: Vec<Vec<(String, Tensor)>>,
    /// The layers that were frozen ([`Model::set_trainable`]); restoring freezes exactly these.
    /// `None` in checkpoints written before freezing existed, which change no layer.
    #[serde(default)]
    pub frozen_layers: Option<Vec<String>>,
    /// The loss weighting strategy's name and state ([`crate::loss_weighting::Strategy::state`]);
    /// its variables are tensors of the file (`loss_weighting/<name>`).
    #[serde(default)]
    pub loss_weighting: Option<(String, serde_json::Value)>,
}

/// The metadata keys of a checkpoint file.
const META_CHECKPOINT: &str = "kiln.checkpoint";
const META_TENSORS: &str = "kiln.tensors";
/// The prefix of a loss weighting strategy's variables among a checkpoint's tensors.
const LOSS_WEIGHTING: &str = "loss_weighting/";

/// The CRC-32 of every tensor's bytes, in name order: what the manifest promises.
fn manifest(tensors: &std::collections::BTreeMap<String, Tensor>) -> Result<Vec<(String, u32)>> {
    use safetensors::View;
    tensors
        .iter()
        .map(|(name, t)| Ok((name.clone(), crc32fast::hash(&t.data()))))
        .collect()
}

/// A checkpoint's file: `<dir>/<stem>.safetensors`.
pub fn checkpoint_path(dir: impl AsRef<Path>, stem: &str) -> PathBuf {
    let dir = dir.as_ref();
    dir.join(format!("{stem}.safetensors"))
}

impl Model {
    /// Saves weights, optimizer state, callback state and progress as one file,
    /// `<dir>/<stem>.safetensors` (written to a temporary name, flushed and renamed, so that a
    /// crash at any point leaves either the previous checkpoint or this one, whole).
    ///
    /// # Errors
    /// When the model is not compiled or the file cannot be written (the message names it).
    pub fn save_checkpoint(
        &self,
        dir: impl AsRef<Path>,
        stem: &str,
        epochs_done: usize,
        history: &History,
    ) -> Result<()> {
        let dir = dir.as_ref();
        let compiled = self
            .compiled
            .as_ref()
            .ok_or_else(crate::model::not_compiled)?;
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
            stopped: self.stop_requested,
            run: self.run_identity.clone(),
            callback_tensors: Vec::new(),
            frozen_layers: Some(self.frozen_layers()),
            loss_weighting: compiled.weighting.as_ref().map(|w| {
                let s = w.lock();
                (s.name().to_string(), s.state())
            }),
        };
        std::fs::create_dir_all(dir).map_err(|e| crate::io::io_error(dir, e))?;
        let mut tensors = std::collections::BTreeMap::new();
        let weights = self.weights();
        for w in &weights {
            tensors.insert(
                format!("weights/{}", w.name),
                w.var.as_tensor().contiguous()?,
            );
        }
        // A strategy's variables are saved, and optimized, as weights named
        // `loss_weighting/<name>`.
        let mut named: Vec<(String, candle_core::Var)> = weights
            .iter()
            .map(|w| (w.name.clone(), w.var.clone()))
            .collect();
        for (name, var) in compiled.weighting.iter().flat_map(|w| &w.variables) {
            let name = format!("{LOSS_WEIGHTING}{name}");
            tensors.insert(name.clone(), var.as_tensor().contiguous()?);
            named.push((name, var.clone()));
        }
        for (slot, id, value) in compiled.optimizer.state() {
            let Some((name, _)) = named.iter().find(|(_, v)| v.as_tensor().id() == id) else {
                continue;
            };
            tensors.insert(format!("optimizer/{slot}/{name}"), value.contiguous()?);
        }
        for (i, named) in self.callback_tensors.iter().enumerate() {
            for (name, t) in named {
                tensors.insert(format!("callbacks/{i}/{name}"), t.contiguous()?);
            }
        }
        let mut metadata = HashMap::new();
        metadata.insert(META_CHECKPOINT.to_string(), json_text(&meta)?);
        metadata.insert(META_TENSORS.to_string(), json_text(&manifest(&tensors)?)?);
        crate::io::write_safetensors(&checkpoint_path(dir, stem), &tensors, Some(metadata))
    }

    /// Restores a checkpoint written by [`Model::save_checkpoint`] into this (compiled) model,
    /// after checking that the file is whole and belongs to this model: every tensor the
    /// checkpoint lists is present with its recorded checksum, every weight is there with the
    /// model's shape, and optimizer state exists only for the model's weights.
    ///
    /// # Errors
    /// When the file is missing, unreadable, not a kiln checkpoint, damaged, or from another
    /// model; the message names the file and the tensor.
    pub fn load_checkpoint(&mut self, dir: impl AsRef<Path>, stem: &str) -> Result<Checkpoint> {
        let dir = dir.as_ref();
        let (meta, tensors) = read_checkpoint(dir, stem, self.device())?;
        self.restore_checkpoint(&checkpoint_path(dir, stem), meta, tensors)
    }

    /// Restores what [`read_checkpoint`] read from `path` (see [`Model::load_checkpoint`]).
    pub(crate) fn restore_checkpoint(
        &mut self,
        path: &Path,
        mut meta: Checkpoint,
        tensors: HashMap<String, Tensor>,
    ) -> Result<Checkpoint> {
        let bad = |msg: String| Error::Data(format!("{}: {msg}", path.display()));
        let weights = self.weights();
        for w in &weights {
            let t = tensors.get(&format!("weights/{}", w.name)).ok_or_else(|| {
                bad(format!(
                    "no weight `{}`: the checkpoint is from another model",
                    w.name
                ))
            })?;
            if t.dims() != w.var.dims() {
                return Err(bad(format!(
                    "weight `{}` has shape {:?}, the model's has {:?}: the checkpoint is from \
                     another model",
                    w.name,
                    t.dims(),
                    w.var.dims()
                )));
            }
        }
        let mut optimizer_state = Vec::new();
        let mut callback_tensors: Vec<Vec<(String, Tensor)>> = Vec::new();
        // The strategy's variables, as weights named `loss_weighting/<name>`.
        let strategy_vars: Vec<(String, candle_core::Var)> = self
            .compiled
            .as_ref()
            .and_then(|c| c.weighting.as_ref())
            .map(|w| {
                w.variables
                    .iter()
                    .map(|(n, v)| (format!("{LOSS_WEIGHTING}{n}"), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let saved = meta.loss_weighting.as_ref().map(|(n, _)| n.as_str());
        let ours = self
            .compiled
            .as_ref()
            .and_then(|c| c.weighting.as_ref())
            .map(|w| w.lock().name().to_string());
        if saved != ours.as_deref() {
            return Err(bad(format!(
                "the checkpoint was written with loss weighting {}, and this model is compiled \
                 with {}: resume with the same strategy",
                saved.map_or("none".into(), |n| format!("`{n}`")),
                ours.map_or("none".into(), |n| format!("`{n}`"))
            )));
        }
        for (name, var) in &strategy_vars {
            let t = tensors.get(name).ok_or_else(|| {
                bad(format!(
                    "no `{name}`: the checkpoint's loss weighting is for other terms"
                ))
            })?;
            if t.dims() != var.dims() {
                return Err(bad(format!(
                    "`{name}` has shape {:?}, the strategy's {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
        }
        for (key, value) in &tensors {
            if key.starts_with(LOSS_WEIGHTING) {
                if !strategy_vars.iter().any(|(n, _)| n == key) {
                    return Err(bad(format!(
                        "tensor `{key}` is a loss weighting variable this model's strategy does \
                         not have: the checkpoint is for other terms"
                    )));
                }
            } else if let Some(name) = key.strip_prefix("weights/") {
                if !weights.iter().any(|w| w.name == name) {
                    return Err(bad(format!(
                        "weight `{name}` is not in this model: the checkpoint is from another model"
                    )));
                }
            } else if let Some(rest) = key.strip_prefix("optimizer/") {
                let (slot, name) = rest
                    .split_once('/')
                    .ok_or_else(|| bad(format!("tensor `{key}` is not a kiln optimizer slot")))?;
                let var = weights
                    .iter()
                    .find(|w| w.name == name)
                    .map(|w| w.var.clone())
                    .or_else(|| {
                        strategy_vars
                            .iter()
                            .find(|(n, _)| n == name)
                            .map(|(_, v)| v.clone())
                    })
                    .ok_or_else(|| {
                        bad(format!(
                            "optimizer state `{key}` is for a weight this model does not have"
                        ))
                    })?;
                if value.dims() != var.dims() {
                    return Err(bad(format!(
                        "optimizer state `{key}` has shape {:?}, its weight {:?}",
                        value.dims(),
                        var.dims()
                    )));
                }
                optimizer_state.push((slot.to_string(), var, value.clone()));
            } else if let Some(rest) = key.strip_prefix("callbacks/") {
                let (index, name) = rest
                    .split_once('/')
                    .and_then(|(i, n)| Some((i.parse::<usize>().ok()?, n)))
                    .ok_or_else(|| bad(format!("tensor `{key}` is not a kiln callback state")))?;
                if callback_tensors.len() <= index {
                    callback_tensors.resize(index + 1, Vec::new());
                }
                callback_tensors[index].push((name.to_string(), value.clone()));
            } else {
                return Err(bad(format!(
                    "tensor `{key}` is not part of a kiln checkpoint"
                )));
            }
        }
        let dtype = self.dtype();
        for w in &weights {
            let t = &tensors[&format!("weights/{}", w.name)];
            w.var.set(&t.to_dtype(dtype)?)?;
        }
        for (name, var) in &strategy_vars {
            var.set(&tensors[name].to_dtype(dtype)?)?;
        }
        let compiled = self
            .compiled
            .as_mut()
            .ok_or_else(crate::model::not_compiled)?;
        for (slot, var, value) in optimizer_state {
            compiled
                .optimizer
                .set_state(&slot, &var, value)
                .map_err(|e| bad(e.to_string()))?;
        }
        compiled.iterations = meta.iterations;
        if let (Some(w), Some((_, state))) = (&compiled.weighting, &meta.loss_weighting) {
            w.lock().load_state(state).map_err(|e| bad(e.to_string()))?;
        }
        compiled.optimizer.set_learning_rate(meta.learning_rate);
        if let Some(frozen) = &meta.frozen_layers {
            let layers: Vec<String> = self.layer_names().iter().map(|l| l.to_string()).collect();
            for layer in layers {
                self.set_trainable(&layer, !frozen.contains(&layer))?;
            }
        }
        meta.callback_tensors = callback_tensors;
        Ok(meta)
    }
}

/// Reads a checkpoint file and checks it against its own manifest.
pub(crate) fn read_checkpoint(
    dir: &Path,
    stem: &str,
    device: &candle_core::Device,
) -> Result<(Checkpoint, HashMap<String, Tensor>)> {
    use candle_core::safetensors::Load;
    let path = checkpoint_path(dir, stem);
    let bad = |msg: String| Error::Data(format!("{}: {msg}", path.display()));
    let bytes = std::fs::read(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let meta_text = metadata.get(META_CHECKPOINT).ok_or_else(|| {
        bad(
            "not a kiln checkpoint (its header has no `kiln.checkpoint` entry; checkpoints of \
             kiln before 0.2 were two files and cannot be resumed safely)"
                .into(),
        )
    })?;
    let meta: Checkpoint = serde_json::from_str(meta_text)
        .map_err(|e| bad(format!("its `kiln.checkpoint` entry cannot be read: {e}")))?;
    let listed: Vec<(String, u32)> = metadata
        .get(META_TENSORS)
        .ok_or_else(|| bad("its header has no `kiln.tensors` manifest".into()))
        .and_then(|t| {
            serde_json::from_str(t)
                .map_err(|e| bad(format!("its `kiln.tensors` manifest cannot be read: {e}")))
        })?;
    let mut tensors = HashMap::new();
    for (name, crc) in &listed {
        let view = file.tensor(name).map_err(|_| {
            bad(format!(
                "tensor `{name}` is listed in the manifest but missing: the file was altered"
            ))
        })?;
        if crc32fast::hash(view.data()) != *crc {
            return Err(bad(format!(
                "tensor `{name}` does not match its checksum: the file is damaged"
            )));
        }
        tensors.insert(name.clone(), view.load(device)?);
    }
    if let Some(extra) = file.names().into_iter().find(|n| !tensors.contains_key(*n)) {
        return Err(bad(format!(
            "tensor `{extra}` is not in the manifest: the file was altered"
        )));
    }
    Ok((meta, tensors))
}

fn json_text<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| Error::Data(e.to_string()))
}

impl Checkpoint {
    /// The saved history as [`History`], each epoch's values in their original order.
    pub fn history(&self) -> History {
        let mut h = History::default();
        for epoch in &self.history {
            let mut logs = Logs::default();
            for (k, v) in epoch {
                logs.set(k.clone(), *v);
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
    /// Writes the checkpoint `last.safetensors` into `dir` after every epoch.
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
