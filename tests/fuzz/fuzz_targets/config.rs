//! Fuzz target: the configuration parser on arbitrary text.
//!
//! `Config::parse` must return a configuration or a clean error, never
//! panic; an error must name the file. A configuration it accepts must
//! compile: its snapshot spec (with a MAC per port) builds, and so does the
//! whole state with no dynamic objects, as vipgated does at start.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vipgate_controlplane::config::Config;
use vipgate_controlplane::state::{self, DesiredState};
use vipgate_dataplane::snapshot::Snapshot;
use vipgate_dataplane::wire::EthernetAddress;

const FILE: &str = "/etc/vipgate/fuzz.toml";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let config = match Config::parse(Path::new(FILE), text) {
        Ok(c) => c,
        Err(e) => {
            let message = e.to_string();
            assert!(message.contains(FILE), "an error that does not name the file: {message}");
            return;
        }
    };
    let macs: Vec<EthernetAddress> =
        (0..config.ports().len()).map(|i| EthernetAddress([2, 0, 0, 0, (i >> 8) as u8, i as u8])).collect();
    let spec = config.snapshot_spec(&macs);
    if let Err(e) = Snapshot::build(&spec) {
        panic!("an accepted configuration does not compile: {e}\n{text}");
    }
    if let Err(e) = state::compile(&config, &macs, &DesiredState::default()) {
        panic!("an accepted configuration does not compile with no dynamic state: {e:?}\n{text}");
    }
    assert!(config.workers() >= 1, "an accepted configuration without workers");
    assert!(config.restart_required(&config).is_none(), "a configuration differs from itself");
});
