//! The `kiln` command.

mod default_run;

use clap::{Parser, Subcommand};
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
    /// Train a model. Without a run file, trains the built-in default: a digits classifier
    /// with focal loss and an L2 weight penalty, and reports every loss term.
    Train {
        /// Number of epochs.
        #[arg(long, default_value_t = 40)]
        epochs: usize,
        /// Seed for weights, shuffling and the held-out split.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Hide the progress bar and per-epoch lines.
        #[arg(long)]
        quiet: bool,
    },
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
        files: Vec<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train {
            epochs,
            seed,
            quiet,
        } => default_run::train(epochs, seed, !quiet)
            .map(|r| r.print())
            .map(|()| true),
        Command::Conformance {
            against: Against::Keras { files },
        } => conformance(&files),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the Keras reference files; true when every case passed.
fn conformance(files: &[std::path::PathBuf]) -> kiln::Result<bool> {
    let mut report = kiln::conformance::Report::default();
    for file in files {
        let mut r = kiln::conformance::run_file(file)?;
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
