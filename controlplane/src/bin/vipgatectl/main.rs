//! vipgatectl, the command-line client of vipgated's API.
//!
//! It talks gRPC to vipgated over its Unix socket (or, with `--endpoint`,
//! over TCP with mutual TLS) and prints what it reads,
//! as tables for people or, with `--json`, as a stable JSON document for
//! scripts. Exit codes: 0 success, 1 the call failed (the message says why),
//! 2 bad usage.
//!
//! Modules: `cli` (the command line), `state` (the desired-state
//! commands, on `ServiceManager`), `json` (the JSON documents), `tables`
//! (the text for people), `apply` (the files `apply` reads), `watch` (the
//! `watch` stream) and `error`.
#![forbid(unsafe_code)]

mod apply;
mod cli;
mod error;
mod json;
mod state;
mod tables;
mod watch;

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use vipgate_controlplane::api::{self, ApiError, pb};

use cli::{Cli, Command};
use error::CtlError;
use json::{HealthJson, StatsJson, json};

/// How long one call may take. The daemon answers from memory; a call that
/// takes longer means a hung daemon, and a script must not hang with it.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    // Usage errors exit with clap's code 2 here.
    let cli = Cli::parse();
    // One thread is plenty for a client that makes one call at a time.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vipgatectl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let output = match runtime.block_on(run(&cli)) {
        Ok(output) => output,
        Err(e) => {
            eprintln!("vipgatectl: {e}{}", tls_hint(&cli, &e));
            return if matches!(e, CtlError::Usage(_)) { ExitCode::from(2) } else { ExitCode::FAILURE };
        }
    };
    match std::io::stdout().lock().write_all(output.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`vipgatectl stats | head`): not our failure.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vipgatectl: {}", CtlError::Output(e));
            ExitCode::FAILURE
        }
    }
}

/// Over TLS 1.3 the server checks the client's certificate after the
/// client considers the handshake done, so a refused certificate shows up
/// as a first call on a closed connection: say what that most likely means.
fn tls_hint(cli: &Cli, e: &CtlError) -> &'static str {
    match e {
        CtlError::Api(ApiError::Call { status, .. }) | CtlError::Status(status)
            if cli.endpoint.is_some()
                && matches!(
                    status.code(),
                    tonic::Code::Cancelled | tonic::Code::Unavailable | tonic::Code::Unknown
                ) =>
        {
            " (vipgated closed the connection: is --cert signed by the CA in its [api] client_ca, and --key its key?)"
        }
        _ => "",
    }
}

/// Runs the command and returns what to print.
async fn run(cli: &Cli) -> Result<String, CtlError> {
    if !matches!(cli.command, Command::Health | Command::Stats { .. }) {
        return state::run(cli).await;
    }
    let mut client = match (&cli.endpoint, &cli.cert, &cli.key, &cli.ca) {
        (Some(endpoint), Some(cert), Some(key), Some(ca)) => {
            let files = api::TlsClientFiles { cert: cert.clone(), key: key.clone(), ca: ca.clone() };
            api::connect_tls(endpoint, &files).await?
        }
        // clap refuses --endpoint without all three files.
        _ => api::connect_unix(&cli.socket).await?,
    };
    match cli.command {
        Command::Health => {
            let health = client
                .get_health(request(pb::GetHealthRequest {}))
                .await
                .map_err(|s| ApiError::call("GetHealth", s))?
                .into_inner();
            let health = HealthJson::from(health);
            if cli.json { json(&health) } else { Ok(tables::health_table(&health)) }
        }
        Command::Stats { all } => {
            let counters = client
                .get_counters(request(pb::GetCountersRequest {}))
                .await
                .map_err(|s| ApiError::call("GetCounters", s))?
                .into_inner();
            let stats = StatsJson::from(counters);
            if cli.json { json(&stats) } else { Ok(tables::stats_tables(&stats, all)) }
        }
        _ => unreachable!("desired-state commands run in state::run"),
    }
}

/// A request with the call deadline ([`CALL_TIMEOUT`]).
fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}
