//! The `kiln` command line: train, evaluate and predict from run files, list the losses, and
//! check conformance with Keras. It lives in the library so that a program of your own can
//! register custom losses and then offer the very same command:
//!
//! ```no_run
//! use kiln::candle::{Tensor, D};
//! fn main() -> std::process::ExitCode {
//!     kiln::losses::register("my_l1", kiln::losses::loss_fn("my_l1", |t: &Tensor, p: &Tensor| {
//!         Ok((p - t)?.abs()?.mean(D::Minus1)?)
//!     }));
//!     kiln::cli::main() // run files and saved models can now say loss = "my_l1"
//! }
//! ```

mod catalogue;

use crate::run::{RunFile, TrainOptions};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Keras-style neural-network training with first-class losses.
#[derive(Parser)]
#[command(name = "kiln", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train from a run file (TOML). Without one, trains the built-in default: a digits
    /// classifier with focal loss and an L2 weight penalty. Prints every loss term.
    Train {
        /// The run file; the built-in default when left out.
        run: Option<PathBuf>,
        /// Overrides the run file's number of epochs.
        #[arg(long)]
        epochs: Option<usize>,
        /// The run folder for history, weights, model.json, plots and checkpoints
        /// (default: runs/<run file name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Overrides the run file's seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Continue the run in this folder from its last checkpoint.
        #[arg(long, conflicts_with = "out")]
        resume: Option<PathBuf>,
        /// Hide the progress bar and per-epoch lines.
        #[arg(long)]
        quiet: bool,
    },
    /// Check losses (built-in or registered names) against what training relies on: one value
    /// per sample on several shapes and batch sizes, the gradient against finite differences
    /// in f64, finite values at probabilities 0 and 1, logits ±100 and zeros, and the
    /// reductions with sample weights and masks. Exits non-zero when a check fails.
    CheckLoss {
        /// The losses' names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Evaluate saved weights: the loss broken down by term, and the metrics. A run folder
    /// (or its model.json) evaluates on the very rows training held out, prepared as training
    /// prepared them.
    Evaluate {
        /// A run folder, its model.json, or the run file.
        run: PathBuf,
        /// The weights (default: model.safetensors of the run folder).
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Data to evaluate on instead of the run's held-out set: a .csv or an .npz with arrays
        /// x and y, scaled and encoded as the run's training data were.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Label columns of a CSV given with --data, comma-separated (default: the run's
        /// `label_columns`, else `label`).
        #[arg(long)]
        labels: Option<String>,
        /// Evaluate under attack: fgsm:EPS or pgd:EPS[:STEPS[:STEP_SIZE]].
        #[arg(long)]
        attack: Option<String>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Write the model's predictions for some inputs to CSV or NPY (scaled as the run's
    /// training inputs were).
    Predict {
        /// A run folder, its model.json, or the run file.
        run: PathBuf,
        /// The weights (default: model.safetensors of the run folder).
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Inputs: a .csv with a header (every column a feature) or an .npy array.
        #[arg(long)]
        input: PathBuf,
        /// Where to write: .csv or .npy.
        #[arg(long)]
        output: PathBuf,
    },
    /// Print the model of a run as Keras' `model.summary()`: layers, output shapes, trainable
    /// and non-trainable parameter counts.
    Summary {
        /// A run file, a run folder or its model.json.
        run: PathBuf,
    },
    /// Import a Keras 3 `.keras` model into a run folder (model.keras, model.json,
    /// model.safetensors) that `evaluate`, `predict`, `export` and run files take.
    Import {
        /// The `.keras` file.
        model: PathBuf,
        /// The run folder (default: runs/<file name>).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Export a run folder's model, with its weights, as a Keras 3 `.keras` file.
    Export {
        /// A run folder (or its model.json) whose model came from Keras.
        run: PathBuf,
        /// The `.keras` file to write.
        #[arg(long)]
        keras: PathBuf,
        /// The weights (default: model.safetensors of the run folder).
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Leave the compile configuration out (Keras loads the model uncompiled); needed for
        /// a run whose loss setup Keras cannot hold (added terms, loss weighting).
        #[arg(long)]
        uncompiled: bool,
    },
    /// List the built-in losses with their parameters and defaults.
    Losses,
    /// Check kiln against reference values computed by another library.
    Conformance {
        #[command(subcommand)]
        against: Against,
    },
}

#[derive(Subcommand)]
enum Against {
    /// Reference cases written by real Keras 3 (shared/keras-reference/gen_keras_cases.py):
    /// prints one line per failing case and ends with `N passed, M failed`.
    Keras {
        /// The JSON files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// Parses the process's arguments and runs the command; the exit code says whether it worked.
pub fn main() -> ExitCode {
    crate::runtime::configure_cpu_threads();
    let cli = Cli::parse();
    let communicator = match communicator() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Train {
            run,
            epochs,
            out,
            seed,
            resume,
            quiet,
        } => train(run, epochs, out, seed, resume, quiet, communicator.clone()).map(|()| true),
        Command::Evaluate {
            run,
            weights,
            data,
            labels,
            attack,
            json,
        } => evaluate(
            &run,
            weights.as_deref(),
            data.as_deref(),
            labels.as_deref(),
            attack.as_deref(),
            json,
        )
        .map(|()| true),
        Command::Predict {
            run,
            weights,
            input,
            output,
        } => predict(&run, weights.as_deref(), &input, &output).map(|()| true),
        Command::Summary { run } => summary(&run).map(|()| true),
        Command::Import { model, out } => import(&model, out).map(|()| true),
        Command::Export {
            run,
            keras,
            weights,
            uncompiled,
        } => export(&run, weights.as_deref(), &keras, !uncompiled).map(|()| true),
        Command::Losses => {
            catalogue::print();
            Ok(true)
        }
        Command::CheckLoss { names } => check_losses(&names),
        Command::Conformance {
            against: Against::Keras { files },
        } => conformance(&files),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        // One rank of several: print naming the rank and end the run on every rank (MPI
        // aborts the job), so that no rank waits for this one.
        Err(e) if communicator.as_ref().is_some_and(|c| c.size() > 1) => {
            if let Some(c) = &communicator {
                c.fail(&e);
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// MPI's world when this process was started by `mpirun` (and kiln built with the `mpi`
/// feature); `None` otherwise.
#[cfg(feature = "mpi")]
fn communicator() -> crate::Result<Option<crate::distributed::SharedCommunicator>> {
    Ok(crate::distributed::mpi::MpiWorld::init()?
        .map(|w| std::sync::Arc::new(w) as crate::distributed::SharedCommunicator))
}

/// Without the `mpi` feature, a process started by `mpirun` would train alone, N times over
/// the same folder: say so instead.
#[cfg(not(feature = "mpi"))]
fn communicator() -> crate::Result<Option<crate::distributed::SharedCommunicator>> {
    match std::env::var("OMPI_COMM_WORLD_SIZE").ok().filter(|n| n != "1") {
        Some(n) => Err(crate::Error::Distributed(format!(
            "started by mpirun with {n} ranks, but this kiln was built without MPI: build it              with `cargo build --release --features mpi` (needs Open MPI: libopenmpi-dev)"
        ))),
        None => Ok(None),
    }
}

fn train(
    run: Option<PathBuf>,
    epochs: Option<usize>,
    out: Option<PathBuf>,
    seed: Option<u64>,
    resume: Option<PathBuf>,
    quiet: bool,
    communicator: Option<crate::distributed::SharedCommunicator>,
) -> crate::Result<()> {
    let root = communicator.as_ref().is_none_or(|c| c.rank() == 0);
    let (file, stem) = match (&run, &resume) {
        (Some(p), _) => (
            RunFile::from_path(p)?,
            p.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "run".into()),
        ),
        // `--resume DIR` alone continues the run file recorded in the folder.
        (None, Some(dir)) if dir.join("model.json").exists() => {
            (RunFile::from_run_folder(dir)?, "run".to_string())
        }
        (None, _) => (RunFile::default_run(), "default".to_string()),
    };
    let out = resume
        .clone()
        .or(out)
        .unwrap_or_else(|| Path::new("runs").join(&stem));
    let options = TrainOptions {
        epochs,
        seed,
        out: out.clone(),
        resume: resume.is_some(),
        verbose: !quiet,
    };
    let report = file.train_distributed(&options, communicator)?;
    if !root {
        return Ok(());
    }
    if let Some(note) = &report.resumed {
        eprintln!("{note}");
    }
    match &run {
        None if resume.is_none() => {
            println!(
                "kiln default run: UCI digits (8x8), a held-out fifth for the final evaluation"
            );
            println!("model: 64 -> Dense 64 relu (L2 1e-4 on the kernel) -> Dense 10 logits");
            println!("loss: categorical focal crossentropy (gamma 2, from logits) + l2 added term");
        }
        None => println!("kiln run {}", out.display()),
        Some(p) => println!("kiln run {}", p.display()),
    }
    if let Some(last) = report.history.last() {
        println!("final epoch ({}):", report.history.epochs.len());
        for (k, v) in last.iter() {
            println!("  {k:<24} {v:.6}");
        }
    }
    if let Some(test) = &report.test {
        println!("held-out:");
        for (k, v) in test.iter() {
            println!("  {k:<24} {v:.6}");
        }
    }
    println!("run folder: {}", out.display());
    Ok(())
}

/// The run description and the weights named by `run` and `--weights`: a run folder (its
/// model.json and model.safetensors), a model.json, or a run file (with the record of the run
/// folder the weights sit in, when that folder was trained from this very run file).
fn resolve(run: &Path, weights: Option<&Path>) -> crate::Result<(RunFile, PathBuf)> {
    let (file, folder) = if run.is_dir() {
        (
            RunFile::from_path(run.join("model.json"))?,
            Some(run.to_path_buf()),
        )
    } else if run.extension().and_then(|e| e.to_str()) == Some("json") {
        (
            RunFile::from_path(run)?,
            run.parent().map(Path::to_path_buf),
        )
    } else {
        let file = RunFile::from_path(run)?;
        let folder = weights.and_then(Path::parent).map(Path::to_path_buf);
        let file = match folder.as_deref().map(RunFile::from_run_folder) {
            Some(Ok(recorded)) if recorded.same_text(&file) => recorded.with_name_of(&file),
            _ => file,
        };
        (file, None)
    };
    let weights = match (weights, folder) {
        (Some(w), _) => w.to_path_buf(),
        (None, Some(dir)) => dir.join("model.safetensors"),
        (None, None) => {
            return Err(crate::Error::InvalidArgument(format!(
                "{}: a run file needs --weights FILE (or give the run folder instead)",
                run.display()
            )))
        }
    };
    Ok((file, weights))
}

fn evaluate(
    run: &Path,
    weights: Option<&Path>,
    data: Option<&Path>,
    labels: Option<&str>,
    attack: Option<&str>,
    json: bool,
) -> crate::Result<()> {
    let (file, weights) = resolve(run, weights)?;
    let labels: Option<Vec<String>> =
        labels.map(|l| l.split(',').map(|s| s.trim().to_string()).collect());
    let (model, dataset) = file.prepare_for_evaluation(
        data.map(|d| (d, labels.as_deref())),
        &candle_core::Device::Cpu,
    )?;
    model.load_weights(&weights)?;
    // The terms are weighed as training left them, not as a fresh strategy would.
    if model.loss_weighting().is_some() && !model.load_loss_weighting(&weights)? {
        eprintln!(
            "note: {} holds no loss weighting state: `loss` weighs the terms with the \
             strategy's initial weights",
            weights.display()
        );
    }
    let dataset = dataset.ok_or_else(|| {
        crate::Error::Data(
            "no data to evaluate on: give --data FILE, or a run folder or run file with [data]"
                .into(),
        )
    })?;
    let logs = match attack {
        Some(spec) => {
            model.evaluate_under_attack(&dataset, 256, &crate::run::parse_attack(spec)?)?
        }
        None => model.evaluate(&dataset, 256)?,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string(&logs).map_err(|e| crate::Error::Data(e.to_string()))?
        );
    } else {
        for (k, v) in logs.iter() {
            println!("{k:<24} {v:.6}");
        }
    }
    Ok(())
}

fn predict(run: &Path, weights: Option<&Path>, input: &Path, output: &Path) -> crate::Result<()> {
    let (file, weights) = resolve(run, weights)?;
    let device = candle_core::Device::Cpu;
    let (model, preprocessing) = file.prepare_model_only(&device)?;
    model.load_weights(&weights)?;
    let (x, notes) = crate::run::predict_inputs(input, &preprocessing, &model, &device)?;
    for note in notes {
        eprintln!("note: {note}");
    }
    let outputs = model.predict(&[x], 256)?;
    crate::data::write_predictions(output, model.output_names(), &outputs)?;
    eprintln!(
        "wrote {} predictions to {}",
        outputs[0].dims().first().copied().unwrap_or(0),
        output.display()
    );
    Ok(())
}

fn summary(run: &Path) -> crate::Result<()> {
    let file = match run.is_dir() {
        true => RunFile::from_path(run.join("model.json"))?,
        false => RunFile::from_path(run)?,
    };
    let (model, _) = file.prepare_model_only(&candle_core::Device::Cpu)?;
    print!("{}", model.summary());
    Ok(())
}

/// `kiln import`: the `.keras` file (or legacy `.h5` file, as `model.h5`) copied into the run
/// folder, a `model.json` whose model and compile sections point at it, and its weights as
/// `model.safetensors`.
fn import(source: &Path, out: Option<PathBuf>) -> crate::Result<()> {
    let model = crate::Model::from_keras(source)?;
    // Told by content, as Model::from_keras tells them.
    let copy = match crate::keras::is_legacy_h5(source)? {
        true => "model.h5",
        false => "model.keras",
    };
    let stem = source
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("imported");
    let dir = out.unwrap_or_else(|| PathBuf::from("runs").join(stem));
    std::fs::create_dir_all(&dir).map_err(|e| crate::io::io_error(&dir, e))?;
    let bytes = std::fs::read(source).map_err(|e| crate::io::io_error(source, e))?;
    crate::io::write_bytes_atomically(&dir.join(copy), &bytes)?;
    let mut text = format!("[model]\nkeras = \"{copy}\"\n");
    if model.is_compiled() {
        text.push_str("[compile]\nkeras = true\n");
    }
    let run = RunFile::from_text(&source.display().to_string(), &text, dir.clone())?;
    let json = serde_json::to_string_pretty(&run.model_json(0)?)
        .map_err(|e| crate::Error::Data(e.to_string()))?;
    crate::io::write_bytes_atomically(&dir.join("model.json"), json.as_bytes())?;
    model.save_weights(dir.join("model.safetensors"))?;
    let weights: usize = model.weights().iter().map(|w| w.var.elem_count()).sum();
    println!(
        "imported {} ({} layers, {weights} weights{}) into {}",
        source.display(),
        model.layer_names().len(),
        if model.is_compiled() {
            ", compiled"
        } else {
            ""
        },
        dir.display()
    );
    let steps = crate::keras::saved_optimizer_steps(source)?;
    if steps > 0 && model.is_compiled() {
        println!(
            "note: {} holds the state of Keras' optimizer after {steps} step{} (its step count \
             and slots); kiln does not read it and starts the optimizer fresh, as after Keras' \
             compile, so fine-tuning steps differ from Keras continuing from that state",
            source.display(),
            if steps == 1 { "" } else { "s" }
        );
    }
    Ok(())
}

/// `kiln export`: a run folder's model and weights as a `.keras` file.
fn export(run: &Path, weights: Option<&Path>, out: &Path, compile: bool) -> crate::Result<()> {
    let (file, weights) = resolve(run, weights)?;
    let (model, _) = file.prepare_model_only(&candle_core::Device::Cpu)?;
    model.load_weights(&weights)?;
    crate::keras::save(&model, out, compile)?;
    println!("wrote {}", out.display());
    Ok(())
}

/// Runs the Keras reference files; true when every case passed.
/// `kiln check-loss`: each loss's report; false when one failed.
fn check_losses(names: &[String]) -> crate::Result<bool> {
    let mut passed = true;
    for name in names {
        let report = crate::losses::check(name.as_str())?;
        println!("{report}");
        passed &= report.passed();
    }
    Ok(passed)
}

fn conformance(files: &[PathBuf]) -> crate::Result<bool> {
    let mut report = crate::conformance::Report::default();
    for file in files {
        let mut r = crate::conformance::run_file(file)?;
        for line in &mut r.failures {
            *line = format!("{}: {line}", file.display());
        }
        report.merge(r);
    }
    for line in &report.failures {
        println!("{line}");
    }
    println!("{} passed, {} failed", report.passed, report.failed());
    Ok(report.failed() == 0)
}
