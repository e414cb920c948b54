//! `vipgatectl watch`: the state's version, then one line per change
//! (with --json, one JSON object per line) until interrupted.

use std::io::Write as _;

use vipgate_controlplane::api::pb;

use crate::error::CtlError;
use crate::json::{HealthChangeJson, StateJson, WatchJson, health_name};
use crate::state::Client;

/// Prints each Watch message as one line, flushed at once, until the
/// stream ends (an error) or the reader goes away.
pub(crate) async fn watch(client: &mut Client, owner: &str, as_json: bool) -> Result<String, CtlError> {
    // No deadline: the stream lasts until interrupted.
    let request = pb::WatchRequest { owner: owner.to_owned() };
    let mut stream = client.watch(request).await.map_err(CtlError::Status)?.into_inner();
    let mut stdout = std::io::stdout();
    loop {
        let event = match stream.message().await {
            Ok(Some(e)) => e,
            Ok(None) => {
                return Err(CtlError::Status(tonic::Status::unavailable("vipgated ended the watch stream")));
            }
            Err(status) => return Err(CtlError::Status(status)),
        };
        let version = event.version;
        let line = match event.event {
            Some(pb::watch_event::Event::Snapshot(s)) => {
                let s = StateJson::from(s);
                if as_json {
                    serde_json::to_string(&WatchJson { version, snapshot: Some(s), change: None, health: None })?
                } else {
                    format!(
                        "version {version}: state with {} services, {} source pools",
                        s.services.len(),
                        s.source_pools.len()
                    )
                }
            }
            Some(pb::watch_event::Event::Change(c)) => {
                if as_json {
                    serde_json::to_string(&WatchJson { version, snapshot: None, change: Some(c), health: None })?
                } else {
                    let mut line = format!("version {version}: {}", c.cause);
                    for (what, names) in [
                        ("services changed", &c.services_changed),
                        ("services deleted", &c.services_deleted),
                        ("pools changed", &c.pools_changed),
                        ("pools deleted", &c.pools_deleted),
                    ] {
                        if !names.is_empty() {
                            line.push_str(&format!("; {what}: {}", names.join(", ")));
                        }
                    }
                    line
                }
            }
            Some(pb::watch_event::Event::Health(h)) => {
                let h = HealthChangeJson {
                    service: h.service,
                    address: h.address,
                    port: h.port,
                    health: health_name(h.health).to_owned(),
                    reason: h.reason,
                };
                if as_json {
                    serde_json::to_string(&WatchJson { version, snapshot: None, change: None, health: Some(h) })?
                } else {
                    format!(
                        "version {version}: health {} {}:{} {}: {}",
                        h.service, h.address, h.port, h.health, h.reason
                    )
                }
            }
            None => format!("version {version}: (an event this vipgatectl does not know)"),
        };
        let written = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
        match written {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(String::new()),
            Err(e) => return Err(CtlError::Output(e)),
        }
    }
}
