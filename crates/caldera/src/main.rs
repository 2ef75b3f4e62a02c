//! The `caldera` command line: run, inspect, verify.

mod backend;
mod bench;
mod convert;
mod devices;
mod inspect;
mod load;
mod run;
mod serve;
mod synth;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "caldera",
    version,
    about = "Local LLM inference on any GPU with a Vulkan driver, and on the CPU"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate from a prompt, or chat interactively without -p.
    Run(run::RunArgs),
    /// Print a model file's metadata and tensor table.
    Inspect {
        /// A .gguf file or an HF model folder.
        model: PathBuf,
        /// Print every metadata array element instead of a summary.
        #[arg(long)]
        full: bool,
    },
    /// Check a model against a reference fixture (shared/fixtures/hf/<arch>).
    Verify(verify::VerifyArgs),
    /// Measure prefill and decode speed.
    Bench(bench::BenchArgs),
    /// Convert an HF folder to GGUF.
    Convert(convert::ConvertArgs),
    /// List the Vulkan devices and what each supports.
    Devices,
    /// Write a random-weight GGUF with a real model's shapes.
    Synth(synth::SynthArgs),
    /// Serve an OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
}

fn main() -> ExitCode {
    // A closed pipe (`caldera inspect x | head`) ends the process quietly, as other
    // command-line tools do, instead of panicking inside println!.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of a signal has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Run(a) => run::run(a),
        Cmd::Inspect { model, full } => inspect::inspect(&model, full),
        Cmd::Verify(a) => verify::verify(a),
        Cmd::Bench(a) => bench::bench(a),
        Cmd::Convert(a) => convert::convert(a),
        Cmd::Devices => devices::devices(),
        Cmd::Synth(a) => synth::synth(a),
        Cmd::Serve(a) => serve::serve(a),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Threads to use by default: every core the process may run on.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
