//! Persistence of the dynamic desired state: `state.json` in the state
//! directory (`[state] dir`).
//!
//! Owns: the file's format and its atomic replacement. A write goes to a
//! temporary file in the same directory, which is fsynced, renamed over
//! `state.json`, and then the directory is fsynced: after a crash the file
//! holds either the previous state or the new one, never a mix. Must not
//! validate the state (that is [`crate::state`]'s job).
//!
//! The file is JSON:
//!
//! ```json
//! { "format": 1, "state": { "version": 7, "services": { ... }, "source_pools": { ... } } }
//! ```
//!
//! `format` is the file format's version; this vipgated reads format 1
//! only and refuses any other rather than guess.

use crate::state::DesiredState;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The file format this vipgated writes and reads.
pub const FORMAT: u32 = 1;
/// The state file's name in the state directory.
pub const FILE_NAME: &str = "state.json";

/// Why the state could not be read or written. Each names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The file exists but could not be read.
    #[error("state file {}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not a state file this vipgated understands.
    #[error(
        "state file {}: {reason}; vipgated does not start over a state file it cannot read: restore it from a backup, or move it away to start with no dynamic services",
        path.display()
    )]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Writing the new state failed; the previous one is still in place.
    #[error("state file {}: cannot write: {source}", path.display())]
    Write {
        /// The file (or its directory).
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// The file as read; `format` was checked before the rest is parsed.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    #[allow(dead_code)]
    format: u32,
    state: DesiredState,
}

/// [`StateFile`] borrowing the state, for writing it without a copy.
#[derive(Serialize)]
struct StateFileRef<'a> {
    format: u32,
    state: &'a DesiredState,
}

/// The state directory.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// The store in `dir` (created on the first write).
    pub fn new(dir: &Path) -> Store {
        Store { dir: dir.to_owned() }
    }

    /// Path of the state file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// Reads the persisted state; a missing file is the empty state
    /// (version 0). A file that cannot be read or parsed is an error, never
    /// an empty state.
    pub fn load(&self) -> Result<DesiredState, StoreError> {
        let path = self.path();
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(DesiredState::default()),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        // The format first, so a newer file says so rather than failing on
        // a field this version does not know.
        let format = serde_json::from_slice::<serde_json::Value>(&text)
            .map_err(|e| StoreError::Parse { path: path.clone(), reason: format!("not valid JSON: {e}") })?
            .get("format")
            .and_then(serde_json::Value::as_u64);
        match format {
            Some(f) if f == u64::from(FORMAT) => {}
            Some(f) => {
                return Err(StoreError::Parse {
                    path,
                    reason: format!("format {f} is not supported (this vipgated reads format {FORMAT})"),
                });
            }
            None => return Err(StoreError::Parse { path, reason: "no \"format\" number".to_owned() }),
        }
        let file: StateFile =
            serde_json::from_slice(&text).map_err(|e| StoreError::Parse { path, reason: e.to_string() })?;
        Ok(file.state)
    }

    /// Replaces the persisted state atomically and durably.
    pub fn save(&self, state: &DesiredState) -> Result<(), StoreError> {
        let path = self.path();
        let write_err = |p: &Path| {
            let p = p.to_owned();
            move |source| StoreError::Write { path: p, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(write_err(&self.dir))?;
        let tmp = self.dir.join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
        // Compact: at 10,000 services of 10 backends the pretty form is
        // twice the size (18 MB against 9), and the whole file is written
        // and fsynced on every change.
        let text = serde_json::to_vec(&StateFileRef { format: FORMAT, state })
            .map_err(|e| StoreError::Write { path: path.clone(), source: std::io::Error::other(e) })?;
        let written = (|| {
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
            f.write_all(&text)?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(StoreError::Write { path, source: e });
        }
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(write_err(&self.dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{
        AdminState, BackendState, ModeState, NewFlowLimitState, ProtocolState, RemovalState, ServiceState,
    };

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vipgate-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn sample(version: u64) -> DesiredState {
        let mut s = DesiredState { version, ..DesiredState::default() };
        s.services.insert(
            "web".to_owned(),
            ServiceState {
                name: "web".to_owned(),
                vip: "198.18.100.5".parse().unwrap(),
                port: 80,
                protocol: ProtocolState::Tcp,
                mode: ModeState::Nat,
                table_size: 251,
                on_backend_removal: RemovalState::Reset,
                backends: vec![BackendState {
                    address: "198.18.1.20".parse().unwrap(),
                    port: 8080,
                    weight: 3,
                    admin_state: AdminState::Draining,
                }],
                health_check: Some(
                    crate::health::HealthCheckInput {
                        kind: Some("udp".into()),
                        payload: Some(vec![0, 1, 0xff]),
                        expect_reply: Some(b"ok".to_vec()),
                        interval_ms: Some(1000),
                        ..Default::default()
                    }
                    .validate()
                    .unwrap(),
                ),
                new_flow_limit: Some(NewFlowLimitState { per_second: 50, burst: 80, prefix_len: 28 }),
            },
        );
        s
    }

    #[test]
    fn a_missing_file_is_the_empty_state() {
        let d = dir("missing");
        assert_eq!(Store::new(&d).load().unwrap(), DesiredState::default());
    }

    #[test]
    fn save_then_load_round_trips_and_leaves_no_temporary_file() {
        let d = dir("roundtrip");
        let store = Store::new(&d);
        store.save(&sample(3)).unwrap();
        store.save(&sample(4)).unwrap();
        assert_eq!(store.load().unwrap(), sample(4));
        let names: Vec<_> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from(FILE_NAME)]);
        let text = std::fs::read_to_string(store.path()).unwrap();
        assert!(text.starts_with("{\"format\":1,"), "{text}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_failed_write_keeps_the_previous_state() {
        let d = dir("failed");
        let store = Store::new(&d);
        store.save(&sample(1)).unwrap();
        // A directory where the temporary file goes makes the write fail.
        let tmp = d.join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
        std::fs::create_dir(&tmp).unwrap();
        std::fs::write(tmp.join("x"), "x").unwrap();
        assert!(matches!(store.save(&sample(2)), Err(StoreError::Write { .. })));
        assert_eq!(store.load().unwrap(), sample(1));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it() {
        let d = dir("corrupt");
        std::fs::create_dir_all(&d).unwrap();
        let store = Store::new(&d);
        for (text, want) in [
            ("{\"format\": 1, \"state\": {\"version\": 3, \"serv", "not valid JSON"),
            ("{\"format\": 2, \"state\": {}}", "format 2 is not supported"),
            ("{\"state\": {}}", "no \"format\" number"),
            (
                "{\"format\": 1, \"state\": {\"version\": \"x\", \"services\": {}, \"source_pools\": {}}}",
                "invalid type",
            ),
        ] {
            std::fs::write(store.path(), text).unwrap();
            let e = store.load().unwrap_err().to_string();
            assert!(e.contains(&store.path().display().to_string()), "{e}");
            assert!(e.contains(want), "wanted {want:?} in {e}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}
