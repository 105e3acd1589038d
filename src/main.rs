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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train { epochs, seed, quiet } => default_run::train(epochs, seed, !quiet).map(|r| r.print()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
