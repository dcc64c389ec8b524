//! The `node` command: runs cluster-store nodes and talks to them.

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

use cluster_store::sim::{SimConfig, Simulation};

#[derive(Parser)]
#[command(
    name = "node",
    version,
    about = "cluster-store: a replicated, causally ordered message log"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the deterministic simulation of the consensus core for one seed
    /// and print what happened (the replay tool for a failing seed).
    Simulate {
        #[arg(long, env = "CLUSTER_STORE_SIM_SEED")]
        seed: u64,
        #[arg(long, env = "CLUSTER_STORE_SIM_STEPS", default_value_t = 2000)]
        steps: u64,
        /// Print every event, not only the summary.
        #[arg(long)]
        verbose: bool,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Simulate {
            seed,
            steps,
            verbose,
        } => {
            let cfg = SimConfig::from_seed(seed, steps);
            println!(
                "seed {seed}: {} voters, {} learners, {} clients, {steps} steps{}",
                cfg.voters,
                cfg.learners,
                cfg.clients,
                if cfg.priorities {
                    ", with priorities"
                } else {
                    ""
                }
            );
            match Simulation::new(cfg).verbose(verbose).run_to_end() {
                Ok(stats) => {
                    println!("passed: {stats:#?}");
                    Ok(())
                }
                Err(failure) => bail!("{failure}"),
            }
        }
    }
}
