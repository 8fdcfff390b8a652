//! The first-boot agent on a node. Thin: the steps live in `picoimg_firstboot::agent`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use picoimg_firstboot::agent::{Agent, Host, Outcome};

/// Configure this node from picoimg/cluster.toml on the boot partition and report progress on
/// the console, in the journal, in /run/picoimg/status.json and in picoimg/status.txt.
#[derive(Parser)]
#[command(name = "picoimg-firstboot", version = picoimg_firstboot::VERSION)]
struct Cli {
    /// Root directory of the system to configure (tests use a temporary tree).
    #[arg(long, default_value = "/", global = true)]
    root: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the configuration steps (picoimg-firstboot.service, before the cluster services).
    Apply,
    /// Wait for this node's cluster services to be healthy, then report ready
    /// (picoimg-firstboot-health.service, after them).
    Health,
    /// Serve the handover channel: hand join material this node's cluster tools mint (join
    /// tokens) to the other nodes of the cluster, sealed with a key derived from the cluster
    /// secret (picoimg-handover.service).
    Serve,
}

fn main() {
    let cli = Cli::parse();
    let mut agent = Agent::new(&cli.root, &Host, true);
    let outcome = match cli.command {
        Command::Apply => agent.apply(),
        Command::Health => agent.health(),
        Command::Serve => {
            if let Err(e) = agent.serve() {
                eprintln!("picoimg: handover: {e:#}");
            }
            std::process::exit(1);
        }
    };
    std::process::exit(match outcome {
        Outcome::Unconfigured | Outcome::Configured | Outcome::Ready => 0,
        Outcome::Failed | Outcome::UnknownNode => 1,
    });
}
