//! vipgated: the vipgate gateway daemon.
#![forbid(unsafe_code)]

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use vipgate_controlplane::config::Config;
use vipgate_daemon as daemon;

/// vipgate gateway daemon: a DPDK Layer-4 load balancer.
#[derive(Debug, Parser)]
#[command(name = "vipgated", version, about = "vipgate gateway daemon: a DPDK Layer-4 load balancer")]
struct Args {
    /// Configuration file.
    #[arg(short, long, default_value = "/etc/vipgate/vipgated.toml")]
    config: PathBuf,
    /// Validate the configuration, print a summary and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (filter, bad_filter) = match std::env::var("VIPGATE_LOG") {
        Err(_) => (tracing_subscriber::EnvFilter::new("info"), None),
        Ok(v) => match tracing_subscriber::EnvFilter::try_new(&v) {
            Ok(f) => (f, None),
            Err(e) => (
                tracing_subscriber::EnvFilter::new("info"),
                Some(format!("VIPGATE_LOG={v:?} is not a valid filter ({e}); logging at info")),
            ),
        },
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Some(warning) = bad_filter {
        tracing::warn!("{warning}");
    }

    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vipgated: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!(
            "{}: OK: {} ports, {} services, {} workers; EAL arguments: {}",
            config.path.display(),
            config.ports().len(),
            config.services().len(),
            config.lcores.len() - 1,
            config.eal_args.join(" ")
        );
        return ExitCode::SUCCESS;
    }
    match daemon::run(&config) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vipgated: {e}");
            ExitCode::FAILURE
        }
    }
}
