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
//! # or a Keras schedule of the optimizer's iterations (exponential_decay,
//! # piecewise_constant_decay, polynomial_decay, inverse_time_decay, cosine_decay,
//! # cosine_decay_restarts, with Keras' parameter names):
//! # optimizer = { type = "adam", learning_rate = { type = "exponential_decay",
//! #   initial_learning_rate = 0.1, decay_steps = 10, decay_rate = 0.5 } }
//! loss = { type = "sparse_categorical_crossentropy", from_logits = true }
//! metrics = ["accuracy", { name = "sparse_top_k_categorical_accuracy", k = 3 }]
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
//! Dense, Conv1D and Conv2D entries take `kernel_constraint` and `bias_constraint` tables
//! (`{ type = "max_norm", max_value = 2.0, axis = 0 }`, `min_max_norm`, `non_neg`,
//! `unit_norm`), applied after every update as Keras does.
//!
//! Unknown keys, wrong types and impossible values are errors naming the file, line and key.

mod build;
mod data;
mod fields;
mod json_lines;
mod outputs;

pub use outputs::{write_history, write_plots};

use crate::adversarial::Adversarial;
use crate::callbacks::{checkpoint, ModelCheckpoint};
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
    /// What a run folder's `model.json` recorded about its data (seed, preparation, held-out
    /// rows), when this was read from one.
    recorded: Option<DataRecord>,
}

/// What a run folder records about its data in `model.json`: enough for `evaluate` and
/// `predict` to see the data exactly as training did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct DataRecord {
    /// The seed training used (the run file's, or `--seed`).
    seed: u64,
    /// The run file's `[data]` section, and the folder its relative paths start from.
    section: Option<serde_json::Value>,
    base: PathBuf,
    /// The preparation applied to inputs and labels.
    preprocessing: data::Preprocessing,
    /// The source rows held out for the final evaluation.
    test_rows: Option<Vec<u32>>,
    /// The run file itself, so that `kiln train --resume DIR` needs nothing else.
    run_name: String,
    run_text: String,
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
    /// What happened on `--resume`, for the person who asked (`None` for a fresh run).
    pub resumed: Option<String>,
}

/// A model with its data, ready to fit or evaluate.
pub struct Prepared {
    /// The compiled model with its added terms.
    pub model: Model,
    /// Training data (`None` when the run has no `[data]` section).
    pub train: Option<Dataset>,
    /// The held-out test data (`test_split` or `test_path`).
    pub test: Option<Dataset>,
    /// The validation data of `validation_path` (`None` with `[fit] validation_split`, which
    /// `fit` takes from the end of `train`).
    pub validation: Option<Dataset>,
    /// The seed the run uses (the run file's, or the override).
    pub seed: u64,
    test_rows: Option<Vec<u32>>,
    preprocessing: data::Preprocessing,
}

/// Where `prepare` takes the data from.
enum DataChoice<'a> {
    /// The run file's `[data]` section, with the held-out rows a run folder recorded, if any.
    RunFile(Option<&'a [u32]>),
    /// A data set given on the command line, already prepared.
    Given(Dataset),
    /// None: the input shape comes from the model section.
    Nothing,
}

const TOP_KEYS: [&str; 6] = ["seed", "data", "model", "compile", "added", "fit"];

/// The run folder's files that one run writes; a fresh run into a folder removes those of an
/// earlier run first, so that no file of another experiment is left beside the new ones.
const RUN_FILES: [&str; 8] = [
    "model.json",
    "model.safetensors",
    "history.json",
    "history.csv",
    "loss.svg",
    "loss.png",
    "metrics.svg",
    "metrics.png",
];

impl RunFile {
    /// Reads a run file (`.toml`) or a saved `model.json`.
    ///
    /// # Errors
    /// When the file cannot be read, or is not valid TOML / a kiln `model.json`.
    pub fn from_path(path: impl AsRef<Path>) -> Result<RunFile> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| crate::io::io_error(path, e))?;
        let text = String::from_utf8(bytes).map_err(|_| {
            Error::Data(format!(
                "{}: not a text file: give a run file (.toml), a run folder or its model.json",
                path.display()
            ))
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        if path.extension().and_then(|e| e.to_str()) == Some("json") {
            return Self::from_model_json(&path.display().to_string(), &text, base);
        }
        Self::from_text(&path.display().to_string(), &text, base)
    }

    /// The run file a run folder was trained from (recorded in its `model.json`).
    ///
    /// # Errors
    /// When the folder has no readable `model.json`, or it records no run file.
    pub fn from_run_folder(dir: impl AsRef<Path>) -> Result<RunFile> {
        let dir = dir.as_ref();
        let path = dir.join("model.json");
        let saved = Self::from_path(&path)?;
        let record = saved.recorded.ok_or_else(|| {
            Error::Data(format!(
                "{}: records no run file (written by an older kiln): give the run file",
                path.display()
            ))
        })?;
        let mut run = Self::from_text(&record.run_name, &record.run_text, record.base.clone())?;
        run.recorded = Some(record);
        Ok(run)
    }

    /// A run file from its text; relative data paths resolve against `base`.
    ///
    /// # Errors
    /// When the text is not valid TOML or has an unknown section.
    pub fn from_text(name: &str, text: &str, base: PathBuf) -> Result<RunFile> {
        let run = RunFile {
            doc: Doc {
                name: name.to_string(),
                text: text.to_string(),
            },
            base,
            recorded: None,
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

    /// Whether two run files have the same text.
    pub(crate) fn same_text(&self, other: &RunFile) -> bool {
        self.doc.text == other.doc.text
    }

    /// This run, reported under `other`'s file name.
    pub(crate) fn with_name_of(mut self, other: &RunFile) -> RunFile {
        self.doc.name = other.doc.name.clone();
        self
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
        let recorded = match value.get("data").filter(|v| !v.is_null()) {
            Some(d) => Some(
                serde_json::from_value::<DataRecord>(d.clone())
                    .map_err(|e| Error::Data(format!("{name}: `data` cannot be read: {e}")))?,
            ),
            None => None,
        };
        // Read with the run-file parser, every value on its own line of the JSON file.
        let text = json_lines::json_to_toml(name, text, &["seed", "model", "compile", "added"])?;
        let mut run = Self::from_text(name, &text, base)?;
        run.recorded = recorded;
        Ok(run)
    }

    fn with_root<T>(&self, f: impl FnOnce(&Fields) -> Result<T>) -> Result<T> {
        let parsed = DeTable::parse(&self.doc.text).map_err(|e| {
            let line = e.span().map(|s| self.doc.line(s.start)).unwrap_or(0);
            Error::InvalidArgument(format!("{} line {line}: {}", self.doc.name, e.message()))
        })?;
        let root = Fields::new(&self.doc, parsed.get_ref(), parsed.span(), "run file");
        f(&root)
    }

    /// The seed: the override, else what a run folder recorded, else the run file's.
    fn seed(&self, root: &Fields, seed_override: Option<u64>) -> Result<u64> {
        let own = root.u64_or("seed", 0)?;
        Ok(seed_override
            .or(self.recorded.as_ref().map(|r| r.seed))
            .unwrap_or(own))
    }

    /// Builds the data, the model, its added terms and compile configuration. A run read from
    /// a run folder (`model.json`, [`RunFile::from_run_folder`]) uses the seed, preparation
    /// and held-out rows recorded there.
    ///
    /// # Errors
    /// Any error of the run file (naming its file, line and key) or of its data files.
    pub fn prepare(&self, seed_override: Option<u64>, device: &Device) -> Result<Prepared> {
        let rows = self.recorded.as_ref().and_then(|r| r.test_rows.as_deref());
        self.prepare_with(seed_override, DataChoice::RunFile(rows), device)
    }

    fn prepare_with(
        &self,
        seed_override: Option<u64>,
        data_choice: DataChoice,
        device: &Device,
    ) -> Result<Prepared> {
        self.with_root(|root| {
            let seed = self.seed(root, seed_override)?;
            let recorded_data = self.recorded.as_ref().and_then(|r| r.section.clone());
            let adapt_here = matches!(data_choice, DataChoice::RunFile(_));
            let (train, test, validation, test_rows, preprocessing) = match data_choice {
                DataChoice::RunFile(rows) => {
                    let loaded = match (root.table("data")?, &recorded_data) {
                        (Some(d), _) => Some(data::load(&d, &self.base, seed, rows, device)?),
                        (None, Some(section)) => Some(self.load_recorded(section, rows, device)?),
                        (None, None) => None,
                    };
                    match loaded {
                        Some(l) => (
                            Some(l.train),
                            l.test,
                            l.validation,
                            l.test_rows,
                            l.preprocessing,
                        ),
                        None => (None, None, None, None, data::Preprocessing::default()),
                    }
                }
                DataChoice::Given(d) => {
                    let _ = root.get("data");
                    (Some(d), None, None, None, self.preprocessing()?)
                }
                DataChoice::Nothing => {
                    let _ = root.get("data");
                    (None, None, None, None, self.preprocessing()?)
                }
            };
            let fit_section = root.table("fit")?;
            let validation_split = match &fit_section {
                Some(fit) => {
                    if let (Some(v), true) = (fit.get("validation_split"), validation.is_some()) {
                        return Err(fit.value_error(
                            "validation_split",
                            v,
                            "[data] validation_path already names the validation data: give \
                             validation_path or validation_split, not both",
                        ));
                    }
                    fit.f64_in_or(
                        "validation_split",
                        0.0,
                        crate::losses::config::Bounds::closed_open(0.0, 1.0),
                    )?
                }
                None => 0.0,
            };
            let standardize = match (preprocessing.standardize, &train) {
                (false, _) => None,
                // Adapted on the rows `fit` trains on: neither the test rows nor the tail
                // that `validation_split` keeps for validation.
                (true, Some(d)) if adapt_here => {
                    let rows = match validation_split > 0.0 {
                        true => d.split_tail(validation_split)?.0,
                        false => d.clone(),
                    };
                    Some(standardize_layer().adapt(&rows.inputs()[0])?)
                }
                // The statistics come with the weights loaded after building.
                (true, _) => Some(standardize_layer()),
            };
            let model_section = root
                .table("model")?
                .ok_or_else(|| root.error("missing the [model] section"))?;
            let input_shape: Vec<usize> = train
                .as_ref()
                .map(|d| d.inputs()[0].dims()[1..].to_vec())
                .unwrap_or_default();
            let mut model =
                build::model(&model_section, &input_shape, seed, standardize, &self.base)?;
            for term in root.tables("added")? {
                build::added(&term, &mut model)?;
            }
            // A Keras model saved without compiling is imported without a [compile] section:
            // it predicts and exports, and says it is not compiled if asked to train.
            let from_keras = model_section.has("keras");
            match root.table("compile")? {
                Some(compile_section) => {
                    let compile = build::compile(&compile_section, &model)?;
                    model
                        .compile(compile)
                        .map_err(|e| compile_section.error(e))?;
                }
                None if from_keras => {}
                None => return Err(root.error("missing the [compile] section")),
            }
            let _ = root.table("fit")?;
            root.finish()?;
            Ok(Prepared {
                model,
                train,
                test,
                validation,
                seed,
                test_rows,
                preprocessing,
            })
        })
    }

    /// The data of a run folder's `model.json`, loaded as training loaded it.
    fn load_recorded(
        &self,
        section: &serde_json::Value,
        rows: Option<&[u32]>,
        device: &Device,
    ) -> Result<data::Loaded> {
        let record = self.recorded.as_ref().expect("called with a record");
        let mut table = toml::Table::new();
        let v: toml::Value = serde_json::from_value(section.clone())
            .map_err(|e| Error::Data(format!("{}: `data` cannot be read: {e}", self.doc.name)))?;
        table.insert("data".into(), v);
        let text = toml::to_string(&table).map_err(|e| Error::Data(e.to_string()))?;
        let doc = RunFile::from_text(
            &format!("{} (data)", self.doc.name),
            &text,
            record.base.clone(),
        )?;
        doc.with_root(|root| {
            let d = root.table("data")?.expect("inserted above");
            data::load(&d, &record.base, record.seed, rows, device)
        })
    }

    /// The preparation this run applies to its data: recorded by a run folder, or read from
    /// the run file's `[data]` section.
    fn preprocessing(&self) -> Result<data::Preprocessing> {
        if let Some(r) = &self.recorded {
            return Ok(r.preprocessing.clone());
        }
        self.with_root(|root| match root.table("data")? {
            Some(d) => data::Preprocessing::from_section(&d),
            None => Ok(data::Preprocessing::default()),
        })
    }

    /// The model, built and compiled, for `evaluate` and `predict`, with the data to evaluate
    /// on: `given` (a file, prepared as the run prepared its data) or the run's own held-out
    /// set (the rows the run folder recorded).
    pub(crate) fn prepare_for_evaluation(
        &self,
        given: Option<(&Path, Option<&[String]>)>,
        device: &Device,
    ) -> Result<(Model, Option<Dataset>)> {
        match given {
            Some((path, labels)) => {
                let prep = self.preprocessing()?;
                let d = data::load_given(path, labels, &prep, device)?;
                let p = self.prepare_with(None, DataChoice::Given(d.clone()), device)?;
                Ok((p.model, Some(d)))
            }
            None => {
                let p = self.prepare(None, device)?;
                Ok((p.model, p.test.or(p.validation).or(p.train)))
            }
        }
    }

    /// The model alone (input shape from the model section or `model.json`), with the data
    /// preparation the run applies, for `predict`.
    pub(crate) fn prepare_model_only(
        &self,
        device: &Device,
    ) -> Result<(Model, data::Preprocessing)> {
        let prep = self.preprocessing()?;
        // A model that takes its input shape from the data needs the data; one that names its
        // inputs (every model.json does) is built without reading any.
        let names_inputs = self.with_root(|root| {
            Ok(root
                .table("model")?
                .is_some_and(|m| m.has("inputs") || m.has("keras")))
        })?;
        let p = match names_inputs {
            true => self.prepare_with(None, DataChoice::Nothing, device)?,
            false => self.prepare(None, device)?,
        };
        Ok((p.model, prep))
    }

    /// The `model.json` of this run: the model, compile and added sections (no data), enough to
    /// rebuild the model.
    ///
    /// # Errors
    /// When the run file's text does not parse.
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
            Ok(serde_json::Value::Object(out))
        })
    }

    /// What identifies this run for `--resume`: every section but the number of epochs, the
    /// seed, and a checksum of the data as loaded.
    fn identity(&self, seed: u64, prepared: &Prepared) -> Result<serde_json::Value> {
        let mut id = self.with_root(|root| {
            let mut out = serde_json::Map::new();
            for key in ["data", "model", "compile", "added", "fit"] {
                if let Some(v) = root.get(key) {
                    out.insert(key.into(), fields::to_json(v.get_ref()));
                }
            }
            Ok(out)
        })?;
        if let Some(fit) = id.get_mut("fit").and_then(|f| f.as_object_mut()) {
            fit.remove("epochs");
        }
        id.insert("seed".into(), seed.into());
        let mut crc = crc32fast::Hasher::new();
        let mut samples = 0;
        for d in prepared
            .train
            .iter()
            .chain(&prepared.test)
            .chain(&prepared.validation)
        {
            samples += d.len();
            for t in d
                .inputs()
                .iter()
                .chain(d.targets())
                .chain(d.sample_weight())
            {
                use safetensors::View;
                crc.update(&t.contiguous()?.data());
            }
        }
        id.insert(
            "data_content".into(),
            serde_json::json!({ "samples": samples, "crc32": crc.finalize() }),
        );
        Ok(serde_json::Value::Object(id))
    }

    /// Trains as `kiln train` does, writing the run folder. The folder is locked while this
    /// runs; a fresh run first removes an earlier run's files; `--resume` continues from the
    /// last checkpoint after checking that it belongs to this run (the same sections, seed and
    /// data), and starts from the beginning when the run was stopped before its first
    /// checkpoint.
    ///
    /// # Errors
    /// When the folder is in use, the checkpoint is from another run or damaged, or anything
    /// in the run fails; every message names the file or key.
    pub fn train(&self, options: &TrainOptions) -> Result<TrainReport> {
        self.train_distributed(options, None)
    }

    /// [`RunFile::train`] as one rank of a data-parallel run (`mpirun -np N kiln train`): every
    /// rank trains its shard of each batch ([`crate::Fit::distributed`]); rank 0 alone locks
    /// and writes the run folder and its checkpoints, and every rank reads the checkpoint to
    /// resume from (the folder must be one all ranks see: a shared folder on a cluster). The
    /// run records its number of ranks, so `--resume` refuses another number. With no
    /// communicator, or one of one rank, this is [`RunFile::train`].
    ///
    /// # Errors
    /// As [`RunFile::train`], and [`Error::Distributed`] when the ranks disagree or one fails.
    pub fn train_distributed(
        &self,
        options: &TrainOptions,
        communicator: Option<crate::distributed::SharedCommunicator>,
    ) -> Result<TrainReport> {
        let communicator = communicator.filter(|c| c.size() > 1);
        let root = communicator.as_ref().is_none_or(|c| c.rank() == 0);
        let device = Device::Cpu;
        let out = &options.out;
        if options.resume && !out.is_dir() {
            return Err(Error::State(format!(
                "cannot resume from {}: no such run folder (check the path; a run stopped \
                 before it created its folder has nothing to resume: start it again without \
                 --resume)",
                out.display()
            )));
        }
        let _lock = match root {
            true => Some(crate::io::RunLock::acquire(out)?),
            false => None,
        };
        let checkpoints = out.join("checkpoints");
        if root {
            crate::io::remove_stale_temporaries(out)?;
            crate::io::remove_stale_temporaries(&checkpoints)?;
        }
        // `--seed` given when training is remembered: resuming the same run file without it
        // continues with that seed.
        let recorded_seed = match options.resume {
            true => recorded_seed(out, &self.doc.text),
            false => None,
        };
        let prepared = self.prepare(options.seed.or(recorded_seed), &device)?;
        let seed = prepared.seed;
        let mut identity = self.identity(seed, &prepared)?;
        if let (Some(c), Some(id)) = (&communicator, identity.as_object_mut()) {
            id.insert("ranks".into(), c.size().into());
        }
        let record = DataRecord {
            seed,
            section: self.with_root(|r| Ok(r.get("data").map(|v| fields::to_json(v.get_ref()))))?,
            base: absolute(&self.base),
            preprocessing: prepared.preprocessing.clone(),
            test_rows: prepared.test_rows.clone(),
            run_name: self.doc.name.clone(),
            run_text: self.doc.text.clone(),
        };
        let Prepared {
            mut model,
            train,
            test,
            validation,
            ..
        } = prepared;
        model.run_identity = Some(identity.clone());
        let train = train.ok_or_else(|| {
            Error::Data(format!("{}: train needs a [data] section", self.doc.name))
        })?;
        let (mut fit, best_monitor) = self.with_root(|root| match root.table("fit")? {
            Some(f) => build::fit(&f),
            None => Ok((crate::Fit::new(), None)),
        })?;
        let planned_epochs = options.epochs.unwrap_or(fit.planned_epochs());
        fit = fit
            .epochs(planned_epochs)
            .seed(seed)
            .verbose(options.verbose);
        if let Some(v) = validation {
            fit = fit.validation_data(v);
        }
        let last = checkpoint::checkpoint_path(&checkpoints, "last");
        let mut previous = History::default();
        let mut resumed = None;
        let mut finished = false;
        let mut done = None;
        if options.resume && last.exists() {
            let cannot =
                |e: Error| Error::State(format!("cannot resume from {}: {e}", out.display()));
            let (meta, tensors) =
                checkpoint::read_checkpoint(&checkpoints, "last", &device).map_err(cannot)?;
            if let Some(diff) = first_difference(meta.run.as_ref(), &identity) {
                return Err(Error::State(format!(
                    "cannot resume from {}: its run differs from {} at {diff}: resume with the \
                     run file that trained it (or leave the run file out), or train into another \
                     --out",
                    out.display(),
                    self.doc.name
                )));
            }
            let ckpt = model
                .restore_checkpoint(&last, meta, tensors)
                .map_err(cannot)?;
            previous = ckpt.history();
            finished = ckpt.stopped || ckpt.epochs_done >= planned_epochs;
            done = Some(ckpt.epochs_done);
            resumed = Some(if finished {
                format!(
                    "the run in {} had already finished ({} epochs{}): nothing to train; its \
                     final files are rewritten{}",
                    out.display(),
                    ckpt.epochs_done,
                    if ckpt.stopped {
                        ", stopped by a callback"
                    } else {
                        ""
                    },
                    if ckpt.stopped {
                        ""
                    } else {
                        " (give --epochs N to train on)"
                    }
                )
            } else {
                format!(
                    "resumed {} at epoch {} of {planned_epochs}",
                    out.display(),
                    ckpt.epochs_done
                )
            });
            fit = fit
                .initial_epoch(ckpt.epochs_done)
                .callback_states(ckpt.callback_states.clone())
                .callback_tensor_states(ckpt.callback_tensors.clone());
        } else {
            if options.resume {
                resumed = Some(format!(
                    "{} has no checkpoint yet (the run stopped before its first epoch ended): \
                     training from the start",
                    out.display()
                ));
            }
            // A fresh run: no file of an earlier experiment may stay beside this one's.
            for name in RUN_FILES.iter().filter(|_| root) {
                remove_if_present(&out.join(name))?;
            }
            for stem in ["last", "best"].into_iter().filter(|_| root) {
                remove_if_present(&checkpoint::checkpoint_path(&checkpoints, stem))?;
                remove_if_present(&checkpoints.join(format!("{stem}.json")))?;
            }
        }
        let mut checkpoint = ModelCheckpoint::new(&checkpoints).resuming(previous.clone());
        if let Some(m) = best_monitor {
            checkpoint = checkpoint.save_best(m);
        }
        if root {
            fit = fit.callback(checkpoint);
            // Model description first: a run stopped part-way can still be evaluated.
            let mut json = self.model_json_with_shape(seed, &train, out)?;
            json["data"] = serde_json::to_value(&record).map_err(|e| Error::Data(e.to_string()))?;
            let json =
                serde_json::to_string_pretty(&json).map_err(|e| Error::Data(e.to_string()))?;
            crate::io::write_bytes_atomically(&out.join("model.json"), json.as_bytes())?;
        }
        if let Some(c) = &communicator {
            fit = fit.distributed(c.clone());
        }
        let mut history = previous;
        if let (true, Some(done)) = (finished, done) {
            // A finished run trains no epoch, but its callbacks still end training from their
            // saved state: EarlyStopping restores its best weights there, as it did in the run
            // that was never interrupted.
            fit = fit.epochs(done);
        }
        let new = model.fit(&train, fit)?;
        history.epochs.extend(new.epochs);
        if root {
            model.save_weights(out.join("model.safetensors"))?;
            write_history(out, &history)?;
            write_plots(out, &history, &model.metric_names())?;
        }
        let test_logs = match &test {
            Some(t) => Some(model.evaluate(t, 256)?),
            None => None,
        };
        Ok(TrainReport {
            history,
            test: test_logs,
            model,
            resumed,
        })
    }

    fn model_json_with_shape(
        &self,
        seed: u64,
        train: &Dataset,
        out: &Path,
    ) -> Result<serde_json::Value> {
        let mut json = self.model_json(seed)?;
        let shape: Vec<usize> = train.inputs()[0].dims()[1..].to_vec();
        if let Some(model) = json.get_mut("model").and_then(|m| m.as_object_mut()) {
            if let Some(file) = model.get("keras").and_then(|k| k.as_str()) {
                // The folder keeps the Keras architecture it trained as its own model.keras,
                // so that evaluate, predict and export read it from the folder (a path
                // relative to the run file would not resolve there). Its inputs are the
                // Keras file's.
                let source = self.base.join(file);
                let target = out.join("model.keras");
                let same = match (source.canonicalize(), target.canonicalize()) {
                    (Ok(a), Ok(b)) => a == b,
                    _ => false,
                };
                if !same {
                    let bytes = std::fs::read(&source).map_err(|e| Error::Io {
                        path: source.clone(),
                        source: e,
                    })?;
                    crate::io::write_bytes_atomically(&target, &bytes)?;
                }
                model.insert("keras".into(), "model.keras".into());
            } else if !model.contains_key("inputs") {
                model.insert(
                    "inputs".into(),
                    serde_json::json!([{ "name": "input", "shape": shape }]),
                );
            }
        }
        Ok(json)
    }
}

/// The input of `kiln predict`, read and prepared for `model` as the run prepared its training
/// inputs, with notes for the person (label columns dropped, columns reordered).
pub(crate) fn predict_inputs(
    path: &Path,
    preprocessing: &data::Preprocessing,
    model: &Model,
    device: &Device,
) -> Result<(candle_core::Tensor, Vec<String>)> {
    let shapes = model.input_shapes();
    if shapes.len() != 1 {
        return Err(Error::Data(format!(
            "predict reads one input file, but the model takes {} inputs ({:?})",
            shapes.len(),
            model.input_names()
        )));
    }
    data::predict_inputs(path, preprocessing, &shapes[0], device)
}

/// The layer `[data] standardize = true` puts in front of the model.
fn standardize_layer() -> crate::layers::Normalization {
    crate::layers::Normalization::new().with_name(STANDARDIZE_LAYER)
}

/// The name of the layer that standardizes the inputs of a run with `standardize = true`.
pub const STANDARDIZE_LAYER: &str = "standardize";

/// The seed a run folder's `model.json` recorded, if it was trained from this run text.
fn recorded_seed(dir: &Path, run_text: &str) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("model.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let record: DataRecord = serde_json::from_value(v.get("data")?.clone()).ok()?;
    (record.run_text == run_text).then_some(record.seed)
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(crate::io::io_error(path, e)),
    }
}

/// `p` made absolute; the empty path (a run file named without a folder) is the current one.
fn absolute(p: &Path) -> PathBuf {
    let p = if p.as_os_str().is_empty() {
        Path::new(".")
    } else {
        p
    };
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Where two run identities first differ, as `key.path (the folder has A, this run has B)`;
/// `None` when they agree. A checkpoint without an identity (a library user's) agrees.
fn first_difference(saved: Option<&serde_json::Value>, now: &serde_json::Value) -> Option<String> {
    fn walk(path: &str, a: &serde_json::Value, b: &serde_json::Value) -> Option<String> {
        use serde_json::Value::{Array, Object};
        match (a, b) {
            (Object(x), Object(y)) => {
                let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                keys.sort();
                keys.dedup();
                // The data's checksum last: another seed or data section explains it better.
                keys.sort_by_key(|k| path.is_empty() && k.as_str() == "data_content");
                keys.into_iter().find_map(|k| {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    let null = serde_json::Value::Null;
                    walk(&p, x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null))
                })
            }
            (Array(x), Array(y)) if x.len() == y.len() => x
                .iter()
                .zip(y)
                .enumerate()
                .find_map(|(i, (a, b))| walk(&format!("{path}[{i}]"), a, b)),
            _ if a == b => None,
            _ => Some(format!(
                "`{path}` (the run folder has {}, this run has {})",
                if a.is_null() {
                    "nothing".to_string()
                } else {
                    a.to_string()
                },
                if b.is_null() {
                    "nothing".to_string()
                } else {
                    b.to_string()
                }
            )),
        }
    }
    walk("", saved?, now)
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
