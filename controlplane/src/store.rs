//! Persistence of the dynamic desired state: `state.json` in the state
//! directory (`[state] dir`).
//!
//! Owns: the file's format, its atomic replacement, and the directory's
//! lock. A write goes to a temporary file in the same directory, which is
//! fsynced, renamed over `state.json`, and then the directory is fsynced:
//! after a crash the file holds either the previous state or the new one,
//! never a mix; the temporary file a crash leaves is removed at the next
//! start ([`Store::remove_leftovers`]). One vipgated at a time uses a
//! directory: it holds an exclusive `flock` on `vipgated.lock` in it for
//! its whole life ([`Store::lock`]), and the file names its pid. Must not
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
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The file format this vipgated writes and reads.
pub const FORMAT: u32 = 1;
/// The state file's name in the state directory.
pub const FILE_NAME: &str = "state.json";
/// The lock file's name in the state directory.
pub const LOCK_FILE_NAME: &str = "vipgated.lock";

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
    /// Another process holds the directory's lock: another vipgated uses
    /// it.
    #[error(
        "state directory {}: in use by another vipgated ({}, holding {LOCK_FILE_NAME}); stop it, or give this one another [state] dir",
        dir.display(),
        holder.map_or_else(|| "pid unknown".to_owned(), |pid| format!("pid {pid}"))
    )]
    Locked {
        /// The state directory.
        dir: PathBuf,
        /// The pid the lock file names, if it names one.
        holder: Option<u32>,
    },
    /// The lock file could not be created, locked or written.
    #[error("state directory lock {}: {source}", path.display())]
    Lock {
        /// The lock file (or the directory).
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A temporary file an interrupted write left could not be removed.
    #[error("state directory {}: cannot remove the leftover temporary file: {source}", path.display())]
    Leftover {
        /// The file (or the directory, if it could not be listed).
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
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

/// The state directory's lock, held until this is dropped (for vipgated,
/// until it exits: the kernel releases it then, however the process ends).
#[derive(Debug)]
pub struct StoreLock {
    _file: Flock<std::fs::File>,
}

/// Whether `name` is the name of a temporary file [`Store::save`] writes:
/// `.state.json.<pid>.tmp`.
fn is_temporary(name: &str) -> bool {
    name.strip_prefix(&format!(".{FILE_NAME}."))
        .and_then(|rest| rest.strip_suffix(".tmp"))
        .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
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

    /// Takes the directory for this process (creating it if missing): an
    /// exclusive, non-blocking `flock` on its `vipgated.lock`, into which it
    /// then writes this process's pid. Another process holding it is
    /// [`StoreError::Locked`], with the pid it wrote.
    pub fn lock(&self) -> Result<StoreLock, StoreError> {
        let path = self.dir.join(LOCK_FILE_NAME);
        let lock_err = |p: &Path| {
            let p = p.to_owned();
            move |source| StoreError::Lock { path: p, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(lock_err(&self.dir))?;
        // Not truncated on open: until the lock is ours the pid in it is
        // the holder's.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(lock_err(&path))?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                // The holder may not have written its pid yet.
                let _ = file.read_to_string(&mut text);
                return Err(StoreError::Locked { dir: self.dir.clone(), holder: text.trim().parse().ok() });
            }
            Err((_, errno)) => return Err(StoreError::Lock { path, source: errno.into() }),
        };
        file.set_len(0)
            .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
            .map_err(lock_err(&path))?;
        Ok(StoreLock { _file: file })
    }

    /// Removes the temporary files of writes that never finished (a
    /// process killed inside [`Store::save`]), which nothing else would
    /// ever remove, and returns their paths. Only under the directory's
    /// lock, which `_lock` proves: no other process is writing one now.
    pub fn remove_leftovers(&self, _lock: &StoreLock) -> Result<Vec<PathBuf>, StoreError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(StoreError::Leftover { path: self.dir.clone(), source }),
        };
        let mut removed = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| StoreError::Leftover { path: self.dir.clone(), source })?;
            if !entry.file_name().to_str().is_some_and(is_temporary) {
                continue;
            }
            let path = entry.path();
            match std::fs::remove_file(&path) {
                Ok(()) => removed.push(path),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(StoreError::Leftover { path, source }),
            }
        }
        removed.sort();
        Ok(removed)
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
                owner: "k8s/prod".to_owned(),
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
    fn a_locked_directory_is_refused_with_the_holders_pid_until_released() {
        let d = dir("lock");
        let first = Store::new(&d).lock().expect("the first lock");
        let pid = std::process::id();
        assert_eq!(std::fs::read_to_string(d.join(LOCK_FILE_NAME)).unwrap(), format!("{pid}\n"));
        // flock locks belong to an open file: a second open in this process
        // is refused like another process's.
        let e = Store::new(&d).lock().unwrap_err();
        assert!(matches!(e, StoreError::Locked { holder: Some(p), .. } if p == pid), "{e:?}");
        let text = e.to_string();
        assert!(text.contains(&d.display().to_string()), "{text}");
        assert!(text.contains(&format!("in use by another vipgated (pid {pid}, holding vipgated.lock)")), "{text}");
        // The refused attempt left the holder's pid in place.
        assert_eq!(std::fs::read_to_string(d.join(LOCK_FILE_NAME)).unwrap(), format!("{pid}\n"));
        drop(first);
        let again = Store::new(&d).lock().expect("free again once released");
        drop(again);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_holder_that_wrote_no_pid_is_named_unknown() {
        let d = dir("nopid");
        std::fs::create_dir_all(&d).unwrap();
        let file = std::fs::File::create(d.join(LOCK_FILE_NAME)).unwrap();
        let held = Flock::lock(file, FlockArg::LockExclusiveNonblock).unwrap();
        let e = Store::new(&d).lock().unwrap_err();
        assert!(e.to_string().contains("(pid unknown, holding vipgated.lock)"), "{e}");
        drop(held);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn leftover_temporary_files_are_removed_and_nothing_else() {
        let d = dir("leftovers");
        let store = Store::new(&d);
        store.save(&sample(2)).unwrap();
        for name in [".state.json.4242.tmp", ".state.json.17.tmp"] {
            std::fs::write(d.join(name), "{\"format\": 1, \"sta").unwrap();
        }
        let kept = ["notes.tmp", ".state.json.tmp", ".state.json.x1.tmp", "state.json.5.tmp", ".vipgated.5.tmp"];
        for name in kept {
            std::fs::write(d.join(name), "x").unwrap();
        }
        let lock = store.lock().unwrap();
        let removed = store.remove_leftovers(&lock).unwrap();
        assert_eq!(removed, vec![d.join(".state.json.17.tmp"), d.join(".state.json.4242.tmp")]);
        let mut names: Vec<String> =
            std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        let mut want: Vec<String> = kept.iter().chain(&[FILE_NAME, LOCK_FILE_NAME]).map(|s| (*s).to_owned()).collect();
        want.sort();
        assert_eq!(names, want);
        assert_eq!(store.load().unwrap(), sample(2));
        assert!(store.remove_leftovers(&lock).unwrap().is_empty());
        drop(lock);
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
