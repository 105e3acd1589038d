//! Run files: a whole experiment (data, model, compile, added terms, fit, callbacks) described
//! in TOML, trained, evaluated and used for prediction by the `kiln` command.
//!
//! ```toml
//! seed = 0
//! [data]
//! source = "digits"          # digits, csv, npy, npz, idx, blobs, spirals, regression
//! test_split = 0.2
//! [model]
//! layers = [
//!   { type = "dense", name = "hidden", units = 64, activation = "relu", kernel_regularizer = { l2 = 1e-4 } },
//!   { type = "dense", name = "digit", units = 10 },
//! ]
//! [compile]
//! optimizer = { type = "adam", learning_rate = 3e-3 }
//! loss = { type = "sparse_categorical_crossentropy", from_logits = true }
//! metrics = ["accuracy"]
//! [[added]]
//! kind = "fgsm"
//! epsilon = 0.05
//! multiplier = 0.5
//! [fit]
//! epochs = 20
//! validation_split = 0.1
//! callbacks = [{ type = "early_stopping", monitor = "val_loss", patience = 3 }]
//! ```
//!
//! Unknown keys, wrong types and impossible values are errors naming the file, line and key.

mod build;
mod data;
mod fields;
mod outputs;

pub use outputs::{write_history, write_loss_plots};

use crate::adversarial::Adversarial;
use crate::callbacks::ModelCheckpoint;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::model::{History, Logs, Model};
use candle_core::Device;
use fields::{Doc, Fields};
use std::path::{Path, PathBuf};
use toml::de::DeTable;

/// The text of the built-in default run.
pub const DEFAULT_RUN: &str = include_str!("default.toml");

/// A parsed run file.
pub struct RunFile {
    doc: Doc,
    base: PathBuf,
}

/// Options of `kiln train` that override the run file.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Overrides `[fit] epochs`.
    pub epochs: Option<usize>,
    /// Overrides `seed`.
    pub seed: Option<u64>,
    /// The run folder (history, weights, model.json, plots, checkpoints).
    pub out: PathBuf,
    /// Continue the run whose folder this is, from its last checkpoint.
    pub resume: bool,
    /// Show progress.
    pub verbose: bool,
}

/// What `train` produced.
pub struct TrainReport {
    /// Every epoch's logs (a resumed run includes the epochs before the stop).
    pub history: History,
    /// The final evaluation on the held-out test split, if the data section asks for one.
    pub test: Option<Logs>,
    /// The model, trained.
    pub model: Model,
}

/// A model with its data, ready to fit or evaluate.
pub struct Prepared {
    /// The compiled model with its added terms.
    pub model: Model,
    /// Training data (`None` when the run has no `[data]` section).
    pub train: Option<Dataset>,
    /// The held-out test split.
    pub test: Option<Dataset>,
}

const TOP_KEYS: [&str; 6] = ["seed", "data", "model", "compile", "added", "fit"];

impl RunFile {
    /// Reads a run file (`.toml`) or a saved `model.json`.
    pub fn from_path(path: &Path) -> Result<RunFile> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        if path.extension().and_then(|e| e.to_str()) == Some("json") {
            return Self::from_model_json(&path.display().to_string(), &text, base);
        }
        Self::from_text(&path.display().to_string(), &text, base)
    }

    /// A run file from its text; relative data paths resolve against `base`.
    pub fn from_text(name: &str, text: &str, base: PathBuf) -> Result<RunFile> {
        let run = RunFile {
            doc: Doc {
                name: name.to_string(),
                text: text.to_string(),
            },
            base,
        };
        run.with_root(|root| {
            for (k, v) in root.entries() {
                if !TOP_KEYS.contains(&k.as_str()) {
                    return Err(root.value_error(
                        &k,
                        v,
                        format!("unknown section; use one of {TOP_KEYS:?}"),
                    ));
                }
            }
            Ok(())
        })?;
        Ok(run)
    }

    /// The built-in default run.
    pub fn default_run() -> RunFile {
        Self::from_text("(built-in default run)", DEFAULT_RUN, PathBuf::new())
            .expect("the default run parses")
    }

    fn from_model_json(name: &str, text: &str, base: PathBuf) -> Result<RunFile> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::Data(format!("{name}: not JSON: {e}")))?;
        if value.get("format").and_then(|f| f.as_str()) != Some("kiln-model") {
            return Err(Error::Data(format!(
                "{name}: not a kiln model.json (no \"format\": \"kiln-model\")"
            )));
        }
        let mut table = toml::Table::new();
        for key in ["seed", "model", "compile", "added"] {
            if let Some(v) = value.get(key).filter(|v| !v.is_null()) {
                let v: toml::Value = serde_json::from_value(v.clone())
                    .map_err(|e| Error::Data(format!("{name}: `{key}` cannot be read: {e}")))?;
                table.insert(key.to_string(), v);
            }
        }
        let text = toml::to_string(&table).map_err(|e| Error::Data(format!("{name}: {e}")))?;
        Self::from_text(name, &text, base)
    }

    fn with_root<T>(&self, f: impl FnOnce(&Fields) -> Result<T>) -> Result<T> {
        let parsed = DeTable::parse(&self.doc.text).map_err(|e| {
            let line = e.span().map(|s| self.doc.line(s.start)).unwrap_or(0);
            Error::InvalidArgument(format!("{} line {line}: {}", self.doc.name, e.message()))
        })?;
        let root = Fields::new(&self.doc, parsed.get_ref(), parsed.span(), "run file");
        f(&root)
    }

    /// Builds the data, the model, its added terms and compile configuration.
    pub fn prepare(&self, seed_override: Option<u64>, device: &Device) -> Result<Prepared> {
        self.with_root(|root| {
            let seed = match seed_override {
                Some(s) => s,
                None => root.usize_or("seed", 0)? as u64,
            };
            let (train, test) = match root.table("data")? {
                Some(d) => {
                    let (train, test) = data::load(&d, &self.base, seed, device)?;
                    (Some(train), test)
                }
                None => (None, None),
            };
            let model_section = root
                .table("model")?
                .ok_or_else(|| root.error("missing the [model] section"))?;
            let input_shape: Vec<usize> = train
                .as_ref()
                .map(|d| d.inputs()[0].dims()[1..].to_vec())
                .unwrap_or_default();
            let mut model = build::model(&model_section, &input_shape, seed)?;
            for term in root.tables("added")? {
                build::added(&term, &mut model)?;
            }
            let compile_section = root
                .table("compile")?
                .ok_or_else(|| root.error("missing the [compile] section"))?;
            let compile = build::compile(&compile_section, model.output_names())?;
            model
                .compile(compile)
                .map_err(|e| compile_section.error(e))?;
            let _ = root.table("fit")?;
            root.finish()?;
            Ok(Prepared { model, train, test })
        })
    }

    /// The `model.json` of this run: the model, compile and added sections (no data), enough to
    /// rebuild the model.
    pub fn model_json(&self, seed: u64) -> Result<serde_json::Value> {
        self.with_root(|root| {
            let mut out = serde_json::Map::new();
            out.insert("format".into(), "kiln-model".into());
            out.insert("version".into(), 1.into());
            out.insert("seed".into(), seed.into());
            for key in ["model", "compile", "added"] {
                if let Some(v) = root.get(key) {
                    out.insert(key.into(), fields::to_json(v.get_ref()));
                }
            }
            // The input shape is fixed now, so the model can be rebuilt without the data.
            Ok(serde_json::Value::Object(out))
        })
    }

    /// Trains as `kiln train` does, writing the run folder.
    pub fn train(&self, options: &TrainOptions) -> Result<TrainReport> {
        let device = Device::Cpu;
        let Prepared {
            mut model,
            train,
            test,
        } = self.prepare(options.seed, &device)?;
        let train = train.ok_or_else(|| {
            Error::Data(format!("{}: train needs a [data] section", self.doc.name))
        })?;
        let seed = match options.seed {
            Some(s) => s,
            None => self.with_root(|r| r.usize_or("seed", 0))? as u64,
        };
        let (mut fit, best_monitor) = self.with_root(|root| match root.table("fit")? {
            Some(f) => build::fit(&f),
            None => Ok((crate::Fit::new(), None)),
        })?;
        if let Some(e) = options.epochs {
            fit = fit.epochs(e);
        }
        fit = fit.seed(seed).verbose(options.verbose);
        let out = &options.out;
        std::fs::create_dir_all(out).map_err(|source| Error::Io {
            path: out.clone(),
            source,
        })?;
        let checkpoints = out.join("checkpoints");
        let mut previous = History::default();
        if options.resume {
            let ckpt = model
                .load_checkpoint(&checkpoints, "last")
                .map_err(|e| Error::State(format!("cannot resume from {}: {e}", out.display())))?;
            previous = ckpt.history();
            fit = fit
                .initial_epoch(ckpt.epochs_done)
                .callback_states(ckpt.callback_states.clone());
        }
        let mut checkpoint = ModelCheckpoint::new(&checkpoints).resuming(previous.clone());
        if let Some(m) = best_monitor {
            checkpoint = checkpoint.save_best(m);
        }
        fit = fit.callback(checkpoint);
        // Model description first: a run stopped part-way can still be evaluated.
        let json = serde_json::to_string_pretty(&self.model_json_with_shape(seed, &train)?)
            .map_err(|e| Error::Data(e.to_string()))?;
        crate::io::write_atomically(&out.join("model.json"), |tmp| {
            std::fs::write(tmp, &json).map_err(|source| Error::Io {
                path: tmp.to_path_buf(),
                source,
            })
        })?;
        let new = model.fit(&train, fit)?;
        let mut history = previous;
        history.epochs.extend(new.epochs);
        model.save_weights(out.join("model.safetensors"))?;
        write_history(out, &history)?;
        write_loss_plots(out, &history)?;
        let test_logs = match &test {
            Some(t) => Some(model.evaluate(t, 256)?),
            None => None,
        };
        Ok(TrainReport {
            history,
            test: test_logs,
            model,
        })
    }

    fn model_json_with_shape(&self, seed: u64, train: &Dataset) -> Result<serde_json::Value> {
        let mut json = self.model_json(seed)?;
        let shape: Vec<usize> = train.inputs()[0].dims()[1..].to_vec();
        if let Some(model) = json.get_mut("model").and_then(|m| m.as_object_mut()) {
            if !model.contains_key("inputs") {
                model.insert(
                    "inputs".into(),
                    serde_json::json!([{ "name": "input", "shape": shape }]),
                );
            }
        }
        Ok(json)
    }
}

/// Parses `fgsm:EPS` or `pgd:EPS[:STEPS[:STEP_SIZE]]` into an attack.
///
/// ```
/// let a = kiln::run::parse_attack("pgd:0.1:5")?;
/// assert_eq!(a.steps(), 5);
/// assert!(kiln::run::parse_attack("fgsm:x").is_err());
/// # Ok::<(), kiln::Error>(())
/// ```
pub fn parse_attack(spec: &str) -> Result<Adversarial> {
    let bad = || {
        Error::InvalidArgument(format!(
            "attack `{spec}`: use fgsm:EPS or pgd:EPS[:STEPS[:STEP_SIZE]]"
        ))
    };
    let parts: Vec<&str> = spec.split(':').collect();
    let num = |i: usize| -> Result<Option<f64>> {
        parts
            .get(i)
            .map(|p| p.parse::<f64>().map_err(|_| bad()))
            .transpose()
    };
    let eps = num(1)?.ok_or_else(bad)?;
    match parts[0] {
        "fgsm" if parts.len() == 2 => Ok(Adversarial::fgsm(eps)),
        "pgd" if parts.len() <= 4 => {
            let steps = num(2)?.unwrap_or(10.0) as usize;
            let step = num(3)?.unwrap_or(eps / 4.0);
            Ok(Adversarial::pgd(eps, steps, step)
                .norm(crate::adversarial::PerturbationNorm::Infinity))
        }
        _ => Err(bad()),
    }
}
