use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use chorus::replay::{self, ReplayOptions};

#[derive(Parser)]
#[command(
    name = "chorus",
    version,
    about = "Open real-time audio edge for interactive live streaming"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replays a speech corpus through the packet core and prints each track change as JSON.
    Replay(ReplayArgs),
}

#[derive(clap::Args)]
struct ReplayArgs {
    /// Directory of <id>.opus (Ogg Opus) and optional <id>.levels files.
    #[arg(long)]
    corpus: PathBuf,
    /// Number of multiplexed tracks.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=32))]
    tracks: u8,
    /// sourceId played in the main track, never in the multiplexed ones.
    #[arg(long)]
    pinned: Option<String>,
    /// Comma-separated sourceIds this viewer must never receive.
    #[arg(long, value_delimiter = ',')]
    exclude: Vec<String>,
    /// Send no RFC 6464 level: activity is estimated from the Opus payload alone.
    #[arg(long)]
    no_levels: bool,
    /// Emulate sender DTX: quiet frames become one 1-byte packet every 400 ms.
    #[arg(long)]
    dtx: bool,
    /// Packet loss probability (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Uniform random extra delay of 0 to J ms per packet.
    #[arg(long, default_value_t = 0)]
    jitter_ms: u32,
    /// Seed of the network model and of the stream's SSRCs and sequence numbers.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Replay(args) => match replay_cmd(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("chorus replay: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn replay_cmd(a: ReplayArgs) -> Result<(), String> {
    if !(0.0..=1.0).contains(&a.loss) {
        return Err(format!("--loss must be between 0 and 1, got {}", a.loss));
    }
    let speakers = replay::corpus::load(&a.corpus).map_err(|e| e.to_string())?;
    let opts = ReplayOptions {
        tracks: a.tracks,
        pinned: a.pinned,
        exclude: a.exclude.into_iter().filter(|e| !e.is_empty()).collect(),
        levels: !a.no_levels,
        dtx: a.dtx,
        loss: a.loss,
        jitter_ms: a.jitter_ms,
        seed: a.seed,
        ..ReplayOptions::default()
    };
    let result = replay::run(&speakers, &opts)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let io = |e: std::io::Error| e.to_string();
    for c in &result.changes {
        writeln!(
            out,
            "{}",
            serde_json::to_string(c).map_err(|e| e.to_string())?
        )
        .map_err(io)?;
    }
    let summary = serde_json::json!({ "summary": result.summary });
    writeln!(out, "{summary}").map_err(io)?;
    Ok(())
}
