//! Persistence of the dynamic desired state: `state.redb` in the state
//! directory (`[state] dir`), a [redb](https://docs.rs/redb) database.
//!
//! Owns: the database's layout, the transactions that change it, the
//! migration from `state.json` (the file earlier vipgated versions
//! rewrote whole at every change), refusing a damaged file, and the
//! directory's lock. Must not validate the state (that is
//! [`crate::state`]'s job).
//!
//! # Layout
//!
//! Three tables, every value JSON (serde, so a field added to the state's
//! types is stored without a change here):
//!
//! - `services`: service name -> [`ServiceState`];
//! - `source_pools`: pool name -> [`PoolState`];
//! - `meta`: `format` -> the layout's version ([`FORMAT`]), and `state` ->
//!   [`DesiredState`] without its `services` and `source_pools` maps (today
//!   its `version`; any top-level field added later goes there too).
//!
//! A change writes the records of the services and pools it names, and the
//! `meta` record, in one write transaction committed with immediate
//! durability and redb's two-phase commit: the data and the new commit
//! slot are fsynced, then the slot is made the primary one and fsynced
//! again. A crash leaves the previous state or the new one, never a mix;
//! and since a completed commit's slot is always valid, a primary slot
//! that fails its checksum is damage, which redb reports, rather than a
//! torn commit it would silently roll back. The cost of a change is that
//! of its records (a few KiB), not of the whole state.
//!
//! # Damage
//!
//! The file is opened with redb's integrity check: every page reachable
//! from the committed trees is read and its checksum verified, at every
//! start, not only after an unclean shutdown (a plain open trusts a file
//! closed cleanly: a digit flipped inside a record would then be read back
//! as another address). A file redb refuses, a
//! record that does not decode, or a `format` this vipgated does not read
//! stops the start with [`StoreError::Damaged`], which names the file and
//! the way back (move it away, start, `vipgatectl state import` the last
//! export). vipgated never starts with part of its state silently missing.
//!
//! # Migration from `state.json`
//!
//! `state.json` (format 1: `{"format": 1, "state": {...}}`) is imported
//! when there is no `state.redb`, in steps each of which a crash may
//! interrupt:
//!
//! 1. a leftover `state.redb.new` is removed;
//! 2. `state.json` is read and written, in one transaction, to a new
//!    database `state.redb.new`;
//! 3. `state.redb.new` is renamed `state.redb`, and the directory fsynced;
//! 4. `state.json` is renamed `state.json.migrated` (kept as a backup), and
//!    the directory fsynced.
//!
//! Each start looks at the files and finishes what was begun: no
//! `state.redb` means steps 1 to 4 again (`state.json` is still there, and
//! a half-made `state.redb.new` is discarded); `state.redb` beside a
//! `state.json` holding the same state means step 4 again. A `state.json`
//! beside a `state.redb` that holds another state was put there by hand,
//! and the start stops ([`StoreError::Conflict`]) rather than guess which
//! one is meant. A new state directory goes through steps 2 and 3 too, so
//! that a `state.redb` always holds a complete database.
//!
//! # The lock
//!
//! One vipgated at a time uses a directory: it holds an exclusive `flock`
//! on `vipgated.lock` in it for its whole life ([`Store::lock`]), and the
//! file names its pid. The directory's temporary files (`state.redb.new`,
//! and the `.state.json.<pid>.tmp` of earlier versions' interrupted
//! writes) are removed only under it.

use crate::state::{Change, DesiredState, PoolState, ServiceState};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Deserialize;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tracing::info;

/// The layout this vipgated writes and reads in `state.redb`. Format 1 is
/// `state.json`'s.
pub const FORMAT: u32 = 2;
/// The format of `state.json`, which this vipgated migrates.
pub const LEGACY_FORMAT: u32 = 1;
/// The database's name in the state directory.
pub const FILE_NAME: &str = "state.redb";
/// The file earlier versions kept the state in.
pub const LEGACY_FILE_NAME: &str = "state.json";
/// What `state.json` is renamed once imported.
pub const MIGRATED_FILE_NAME: &str = "state.json.migrated";
/// A database being made, renamed [`FILE_NAME`] once complete.
pub const NEW_FILE_NAME: &str = "state.redb.new";
/// The lock file's name in the state directory.
pub const LOCK_FILE_NAME: &str = "vipgated.lock";

const SERVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("services");
const POOLS: TableDefinition<&str, &[u8]> = TableDefinition::new("source_pools");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// `meta` key of the layout's version.
const META_FORMAT: &str = "format";
/// `meta` key of the state's fields besides its two maps.
const META_STATE: &str = "state";
/// The redb page cache: enough for the pages a change reads, bounded
/// whatever the state's size (redb's default is 1 GiB).
const CACHE_BYTES: usize = 32 << 20;

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
    /// `state.json`, to be migrated, is not a state file this vipgated
    /// understands.
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
    /// `state.redb` is damaged (a page fails its checksum, the file is
    /// truncated or is no redb database), holds a record that does not
    /// decode, or is of a format this vipgated does not read.
    #[error(
        "state file {}: {reason}; vipgated does not start with part of its state missing. To recover: move {} away, start vipgated (with no dynamic services), and restore the last export with `vipgatectl state import FILE`",
        path.display(), path.display()
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `state.json` is back beside `state.redb`, holding another state.
    #[error(
        "state directory {}: {LEGACY_FILE_NAME} holds another state than {FILE_NAME}, which is in force; remove {} (or, to go back to it, move {} away first)",
        dir.display(), legacy.display(), path.display()
    )]
    Conflict {
        /// The state directory.
        dir: PathBuf,
        /// `state.json`.
        legacy: PathBuf,
        /// `state.redb`.
        path: PathBuf,
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

/// `state.json` as read; `format` was checked before the rest is parsed.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyFile {
    #[allow(dead_code)]
    format: u32,
    state: DesiredState,
}

/// The state directory and, once [`Store::open`] has run, its database.
/// Clones share the database.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
    check_integrity: bool,
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The database; `None` before [`Store::open`], and after a write
    /// failed (redb refuses every later write on a handle that saw an I/O
    /// error: the next write opens the file again).
    db: Mutex<Option<Database>>,
    /// A write failed: what is on disk may differ from the state in force
    /// in records no later change names, so the next write is of the whole
    /// state ([`Store::batch`]).
    resync: AtomicBool,
}

/// The state directory's lock, held until this is dropped (for vipgated,
/// until it exits: the kernel releases it then, however the process ends).
#[derive(Debug)]
pub struct StoreLock {
    _file: Flock<std::fs::File>,
}

/// The records of one write, serialised: made by [`Store::batch`] on the
/// caller's thread from the state (which need not be copied), then moved
/// to wherever [`Store::write`] runs.
#[derive(Debug)]
pub struct Batch {
    /// [`DesiredState`] without its maps, JSON.
    rest: Vec<u8>,
    /// Each service to write (`Some(JSON)`) or delete (`None`).
    services: Records,
    /// Each pool to write or delete.
    pools: Records,
    /// Every record: the tables are emptied first.
    whole: bool,
}

impl Batch {
    /// The records `change` names, as `state` has them: each service or
    /// pool it lists, changed or deleted alike, is written if `state` has
    /// it and deleted if not; and the `meta` record. Correct whenever
    /// `change` names every record that differs from the stored one (a
    /// name with no record, such as a static service's, deletes nothing).
    pub fn of_change(state: &DesiredState, change: &Change) -> Result<Batch, serde_json::Error> {
        let names = |a: &[String], b: &[String]| {
            let mut all: Vec<String> = a.iter().chain(b).cloned().collect();
            all.sort_unstable();
            all.dedup();
            all
        };
        let services = records(names(&change.services_changed, &change.services_deleted), &state.services)?;
        let pools = records(names(&change.pools_changed, &change.pools_deleted), &state.source_pools)?;
        Ok(Batch { rest: rest_json(state)?, services, pools, whole: false })
    }

    /// Every record of `state`, replacing whatever is stored.
    pub fn whole(state: &DesiredState) -> Result<Batch, serde_json::Error> {
        let services = records(state.services.keys().cloned().collect(), &state.services)?;
        let pools = records(state.source_pools.keys().cloned().collect(), &state.source_pools)?;
        Ok(Batch { rest: rest_json(state)?, services, pools, whole: true })
    }

    /// How many service and pool records it writes or deletes.
    pub fn len(&self) -> usize {
        self.services.len() + self.pools.len()
    }

    /// Whether it writes the `meta` record alone.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// From how many records a batch serialises them on rayon's pool, in
/// parallel: a change of a few objects does it on its own thread.
const PARALLEL_RECORDS: usize = 256;

/// The record of each of `names` in `map`, in that order: its JSON, or
/// `None` (a deletion) for a name `map` does not have. Many are
/// serialised in parallel ([`PARALLEL_RECORDS`]).
fn records<V>(names: Vec<String>, map: &imbl::OrdMap<String, V>) -> Result<Records, serde_json::Error>
where
    V: serde::Serialize + Clone + Send + Sync,
{
    use rayon::prelude::*;
    let record = |name: String| {
        let json = map.get(&name).map(serde_json::to_vec).transpose()?;
        Ok((name, json))
    };
    if names.len() < PARALLEL_RECORDS {
        names.into_iter().map(record).collect()
    } else {
        names.into_par_iter().map(record).collect()
    }
}

/// Records to write (`Some(JSON)`) or delete (`None`), by name.
type Records = Vec<(String, Option<Vec<u8>>)>;

/// `state` without its `services` and `source_pools` maps, as a JSON
/// object: every other field, whatever they are, without copying the
/// maps.
fn rest_json(state: &DesiredState) -> Result<Vec<u8>, serde_json::Error> {
    let value = serde::Serialize::serialize(state, rest::Fields)?;
    serde_json::to_vec(&value)
}

/// A serde serializer of a struct's fields but [`rest::SKIPPED`], to a
/// JSON object. Anything but a struct is an error.
mod rest {
    use serde::Serialize;
    use serde::ser::{Error as _, Impossible, SerializeStruct};
    use serde_json::{Error, Map, Value};

    /// The fields stored in tables of their own.
    pub(super) const SKIPPED: [&str; 2] = ["services", "source_pools"];

    pub(super) struct Fields;

    pub(super) struct Struct(Map<String, Value>);

    fn not_a_struct<T>() -> Result<T, Error> {
        Err(Error::custom("the desired state is not a struct"))
    }

    macro_rules! refuse {
        ($($method:ident($($arg:ty),*);)*) => {
            $(fn $method(self, $(_: $arg),*) -> Result<Value, Error> { not_a_struct() })*
        };
    }

    impl serde::Serializer for Fields {
        type Ok = Value;
        type Error = Error;
        type SerializeSeq = Impossible<Value, Error>;
        type SerializeTuple = Impossible<Value, Error>;
        type SerializeTupleStruct = Impossible<Value, Error>;
        type SerializeTupleVariant = Impossible<Value, Error>;
        type SerializeMap = Impossible<Value, Error>;
        type SerializeStruct = Struct;
        type SerializeStructVariant = Impossible<Value, Error>;

        refuse! {
            serialize_bool(bool);
            serialize_i8(i8);
            serialize_i16(i16);
            serialize_i32(i32);
            serialize_i64(i64);
            serialize_u8(u8);
            serialize_u16(u16);
            serialize_u32(u32);
            serialize_u64(u64);
            serialize_f32(f32);
            serialize_f64(f64);
            serialize_char(char);
            serialize_str(&str);
            serialize_bytes(&[u8]);
            serialize_none();
            serialize_unit();
            serialize_unit_struct(&'static str);
            serialize_unit_variant(&'static str, u32, &'static str);
        }

        fn serialize_some<T: ?Sized + Serialize>(self, _: &T) -> Result<Value, Error> {
            not_a_struct()
        }
        fn serialize_newtype_struct<T: ?Sized + Serialize>(self, _: &'static str, _: &T) -> Result<Value, Error> {
            not_a_struct()
        }
        fn serialize_newtype_variant<T: ?Sized + Serialize>(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: &T,
        ) -> Result<Value, Error> {
            not_a_struct()
        }
        fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, Error> {
            not_a_struct()
        }
        fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, Error> {
            not_a_struct()
        }
        fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeTupleStruct, Error> {
            not_a_struct()
        }
        fn serialize_tuple_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: usize,
        ) -> Result<Self::SerializeTupleVariant, Error> {
            not_a_struct()
        }
        fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, Error> {
            not_a_struct()
        }
        fn serialize_struct(self, _: &'static str, _: usize) -> Result<Struct, Error> {
            Ok(Struct(Map::new()))
        }
        fn serialize_struct_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: usize,
        ) -> Result<Self::SerializeStructVariant, Error> {
            not_a_struct()
        }
    }

    impl SerializeStruct for Struct {
        type Ok = Value;
        type Error = Error;

        fn serialize_field<T: ?Sized + Serialize>(&mut self, key: &'static str, value: &T) -> Result<(), Error> {
            if !SKIPPED.contains(&key) {
                self.0.insert(key.to_owned(), serde_json::to_value(value)?);
            }
            Ok(())
        }

        fn end(self) -> Result<Value, Error> {
            Ok(Value::Object(self.0))
        }
    }
}

/// Whether `name` is the name of a temporary file an earlier version's
/// write of `state.json` made: `.state.json.<pid>.tmp`.
fn is_legacy_temporary(name: &str) -> bool {
    name.strip_prefix(&format!(".{LEGACY_FILE_NAME}."))
        .and_then(|rest| rest.strip_suffix(".tmp"))
        .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// The text of a panic's payload.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned())
}

/// fsyncs the directory `dir`, so that a rename in it is durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all())
}

impl Store {
    /// The store in `dir`, not open yet.
    pub fn new(dir: &Path) -> Store {
        Store { dir: dir.to_owned(), check_integrity: true, inner: Arc::default() }
    }

    /// Whether [`Store::open`] verifies every page's checksum even after a
    /// clean shutdown (it does unless told otherwise: vipgated always
    /// does; the benchmark measures what it costs).
    pub fn with_integrity_check(mut self, check: bool) -> Store {
        self.check_integrity = check;
        self
    }

    /// Path of the database.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// Path of the state file of earlier versions.
    pub fn legacy_path(&self) -> PathBuf {
        self.dir.join(LEGACY_FILE_NAME)
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

    /// Opens the database and returns the state it holds: removes the
    /// temporary files interrupted writes left, migrates `state.json` if
    /// there is no `state.redb` yet (or finishes a migration a crash
    /// interrupted), creates an empty database in a new directory. Only
    /// under the directory's lock, which `_lock` proves. A file that cannot
    /// be read completely is an error, never an empty or partial state.
    pub fn open(&self, _lock: &StoreLock) -> Result<DesiredState, StoreError> {
        self.remove_leftovers()?;
        let path = self.path();
        let legacy_path = self.legacy_path();
        let write_err = |p: &Path| {
            let p = p.to_owned();
            move |source| StoreError::Write { path: p, source }
        };
        // An error, not "missing", if the directory cannot be searched: a
        // database there must never be replaced by a new one.
        let exists = |p: &Path| p.try_exists().map_err(|source| StoreError::Read { path: p.to_owned(), source });
        if exists(&path)? {
            let db = self.open_existing()?;
            let state = read_state(&db).map_err(|reason| StoreError::Damaged { path: path.clone(), reason })?;
            if exists(&legacy_path)? {
                // Migrated, and killed before state.json was renamed; or
                // state.json was put back by hand.
                if load_legacy(&legacy_path)? != state {
                    return Err(StoreError::Conflict { dir: self.dir.clone(), legacy: legacy_path, path });
                }
                self.finish_migration()?;
            }
            *self.inner.db.lock().unwrap_or_else(|e| e.into_inner()) = Some(db);
            return Ok(state);
        }
        let legacy = exists(&legacy_path)?;
        let state = if legacy { load_legacy(&legacy_path)? } else { DesiredState::default() };
        let new = self.dir.join(NEW_FILE_NAME);
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(&new)
            .map_err(redb::Error::from)
            .and_then(|db| {
                let batch = Batch::whole(&state).map_err(|e| redb::Error::Io(std::io::Error::other(e)))?;
                write_batch(&db, &batch)?;
                Ok(db)
            })
            .map_err(|e| StoreError::Write { path: new.clone(), source: std::io::Error::other(e) })?;
        std::fs::rename(&new, &path).map_err(write_err(&path))?;
        sync_dir(&self.dir).map_err(write_err(&self.dir))?;
        if legacy {
            info!(
                from = %legacy_path.display(),
                to = %path.display(),
                version = state.version,
                services = state.services.len(),
                source_pools = state.source_pools.len(),
                "state imported"
            );
            self.finish_migration()?;
        }
        *self.inner.db.lock().unwrap_or_else(|e| e.into_inner()) = Some(db);
        Ok(state)
    }

    /// Step 4 of the migration: `state.json` becomes `state.json.migrated`.
    fn finish_migration(&self) -> Result<(), StoreError> {
        let (from, to) = (self.legacy_path(), self.dir.join(MIGRATED_FILE_NAME));
        std::fs::rename(&from, &to).map_err(|source| StoreError::Write { path: to.clone(), source })?;
        sync_dir(&self.dir).map_err(|source| StoreError::Write { path: self.dir.clone(), source })?;
        info!(from = %from.display(), to = %to.display(), "state migrated; the old state file is kept as a backup");
        Ok(())
    }

    /// Opens `state.redb`, verifying it (see [`Store::with_integrity_check`]).
    /// redb may panic on a file damaged outside it when the check is off:
    /// that is a damaged file too.
    fn open_existing(&self) -> Result<Database, StoreError> {
        let path = self.path();
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            redb::Builder::new()
                .set_cache_size(CACHE_BYTES)
                .set_check_integrity_on_open(self.check_integrity)
                .open(&path)
        }));
        match opened {
            Ok(Ok(db)) => Ok(db),
            // A short read (a truncated file) is an I/O error too.
            Ok(Err(e)) => Err(StoreError::Damaged { path, reason: format!("redb cannot open it: {e}") }),
            Err(panic) => Err(StoreError::Damaged {
                path,
                reason: format!("redb cannot open it: {}", panic_text(panic.as_ref())),
            }),
        }
    }

    /// Removes the temporary files of writes that never finished (a
    /// process killed while making `state.redb.new`, or an earlier
    /// version's while writing `state.json`), which nothing else would ever
    /// remove, and logs each. Under the directory's lock: no other process
    /// is writing one now.
    fn remove_leftovers(&self) -> Result<(), StoreError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(StoreError::Leftover { path: self.dir.clone(), source }),
        };
        let mut leftovers = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| StoreError::Leftover { path: self.dir.clone(), source })?;
            if entry.file_name().to_str().is_some_and(|n| n == NEW_FILE_NAME || is_legacy_temporary(n)) {
                leftovers.push(entry.path());
            }
        }
        leftovers.sort();
        for path in leftovers {
            match std::fs::remove_file(&path) {
                Ok(()) => info!(path = %path.display(), "removed a temporary state file an interrupted write left"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(StoreError::Leftover { path, source }),
            }
        }
        Ok(())
    }

    /// The records a change to `state` writes: those `change` names (see
    /// [`Batch::of_change`]); or every record if an earlier write failed.
    /// Cheap for a change of a few objects: made on the caller's thread,
    /// then given to [`Store::write`] wherever that runs.
    pub fn batch(&self, state: &DesiredState, change: &Change) -> Result<Batch, StoreError> {
        let batch = if self.inner.resync.load(Ordering::Acquire) {
            Batch::whole(state)
        } else {
            Batch::of_change(state, change)
        };
        batch.map_err(|e| StoreError::Write { path: self.path(), source: std::io::Error::other(e) })
    }

    /// Writes `batch` in one transaction, durably (fsynced) before it
    /// returns. On an error nothing of it is in force; the next write must
    /// then be of the whole state (which [`Store::batch`] makes): a change
    /// batch is refused until one is.
    pub fn write(&self, batch: Batch) -> Result<(), StoreError> {
        let path = self.path();
        let err = |source: std::io::Error| StoreError::Write { path: path.clone(), source };
        if !batch.whole && self.inner.resync.load(Ordering::Acquire) {
            return Err(err(std::io::Error::other("an earlier write failed: the whole state must be written first")));
        }
        let mut db = self.inner.db.lock().unwrap_or_else(|e| e.into_inner());
        if db.is_none() {
            if !path.exists() {
                return Err(err(std::io::Error::other("the state database is not open")));
            }
            *db = Some(self.open_existing().map_err(|e| err(std::io::Error::other(e.to_string())))?);
        }
        let handle = db.as_ref().expect("opened above");
        match write_batch(handle, &batch) {
            Ok(()) => {
                if batch.whole {
                    self.inner.resync.store(false, Ordering::Release);
                }
                Ok(())
            }
            Err(e) => {
                self.inner.resync.store(true, Ordering::Release);
                // redb refuses every write on a handle after an I/O error;
                // the next write opens the file again.
                drop(db.take());
                Err(err(std::io::Error::other(e)))
            }
        }
    }

    /// Writes what `change` changed in `state` ([`Store::batch`], then
    /// [`Store::write`]).
    pub fn commit(&self, state: &DesiredState, change: &Change) -> Result<(), StoreError> {
        self.write(self.batch(state, change)?)
    }

    /// Replaces the whole stored state with `state`.
    pub fn replace_all(&self, state: &DesiredState) -> Result<(), StoreError> {
        let batch = Batch::whole(state)
            .map_err(|e| StoreError::Write { path: self.path(), source: std::io::Error::other(e) })?;
        self.write(batch)
    }
}

/// Writes `batch` in one write transaction: immediate durability,
/// two-phase commit (see the module's documentation).
fn write_batch(db: &Database, batch: &Batch) -> Result<(), redb::Error> {
    let mut tx = db.begin_write()?;
    tx.set_durability(Durability::Immediate)?;
    tx.set_two_phase_commit(true);
    if batch.whole {
        tx.delete_table(SERVICES)?;
        tx.delete_table(POOLS)?;
    }
    {
        let mut meta = tx.open_table(META)?;
        meta.insert(META_FORMAT, FORMAT.to_string().as_bytes())?;
        meta.insert(META_STATE, batch.rest.as_slice())?;
        for (def, records) in [(SERVICES, &batch.services), (POOLS, &batch.pools)] {
            let mut table = tx.open_table(def)?;
            for (name, json) in records {
                match json {
                    Some(json) => drop(table.insert(name.as_str(), json.as_slice())?),
                    None => drop(table.remove(name.as_str())?),
                }
            }
        }
    }
    tx.commit()?;
    Ok(())
}

/// The state `db` holds; what is wrong with it if it does not decode.
fn read_state(db: &Database) -> Result<DesiredState, String> {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read_state_inner(db)));
    result.unwrap_or_else(|panic| Err(format!("redb cannot read it: {}", panic_text(panic.as_ref()))))
}

fn read_state_inner(db: &Database) -> Result<DesiredState, String> {
    let redb_err = |e: redb::Error| format!("redb cannot read it: {e}");
    let tx = db.begin_read().map_err(|e| redb_err(e.into()))?;
    let meta = match tx.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Err("no meta table".to_owned()),
        Err(e) => return Err(redb_err(e.into())),
    };
    // The format first, so that a newer file says so rather than failing
    // on a record this version does not know.
    let format = meta.get(META_FORMAT).map_err(|e| redb_err(e.into()))?.ok_or("no format record")?;
    let format: u64 =
        serde_json::from_slice(format.value()).map_err(|e| format!("the format record is not a number: {e}"))?;
    if format != u64::from(FORMAT) {
        return Err(format!("format {format} is not supported (this vipgated reads format {FORMAT})"));
    }
    let rest = meta.get(META_STATE).map_err(|e| redb_err(e.into()))?.ok_or("no state record")?;
    let mut rest: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(rest.value()).map_err(|e| format!("the state record: {e}"))?;
    for key in rest::SKIPPED {
        rest.insert(key.to_owned(), serde_json::Value::Object(Default::default()));
    }
    let mut state: DesiredState =
        serde_json::from_value(serde_json::Value::Object(rest)).map_err(|e| format!("the state record: {e}"))?;
    state.services = read_table::<ServiceState>(&tx, SERVICES, "service", |s| &s.name)?;
    state.source_pools = read_table::<PoolState>(&tx, POOLS, "source pool", |p| &p.name)?;
    Ok(state)
}

/// Every record of `def`, decoded; each must hold its own key as its name.
fn read_table<T>(
    tx: &redb::ReadTransaction,
    def: TableDefinition<&str, &[u8]>,
    what: &str,
    name: impl Fn(&T) -> &String,
) -> Result<imbl::OrdMap<String, T>, String>
where
    T: serde::de::DeserializeOwned + Clone,
{
    let redb_err = |e: redb::Error| format!("redb cannot read it: {e}");
    let table = match tx.open_table(def) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Default::default()),
        Err(e) => return Err(redb_err(e.into())),
    };
    let mut out = imbl::OrdMap::new();
    for entry in table.iter().map_err(|e| redb_err(e.into()))? {
        let (key, value) = entry.map_err(|e| redb_err(e.into()))?;
        let key = key.value();
        let record: T = serde_json::from_slice(value.value()).map_err(|e| format!("the {what} {key:?} record: {e}"))?;
        if name(&record) != key {
            return Err(format!("the {what} {key:?} record is named {:?}", name(&record)));
        }
        out.insert(key.to_owned(), record);
    }
    Ok(out)
}

/// Reads `state.json` (format 1). A file that cannot be read or parsed is
/// an error, never an empty state.
fn load_legacy(path: &Path) -> Result<DesiredState, StoreError> {
    let path = path.to_owned();
    let text = std::fs::read(&path).map_err(|source| StoreError::Read { path: path.clone(), source })?;
    // The format first, so a newer file says so rather than failing on
    // a field this version does not know.
    let format = serde_json::from_slice::<serde_json::Value>(&text)
        .map_err(|e| StoreError::Parse { path: path.clone(), reason: format!("not valid JSON: {e}") })?
        .get("format")
        .and_then(serde_json::Value::as_u64);
    match format {
        Some(f) if f == u64::from(LEGACY_FORMAT) => {}
        Some(f) => {
            return Err(StoreError::Parse {
                path,
                reason: format!("format {f} is not supported (this vipgated reads format {LEGACY_FORMAT})"),
            });
        }
        None => return Err(StoreError::Parse { path, reason: "no \"format\" number".to_owned() }),
    }
    let file: LegacyFile =
        serde_json::from_slice(&text).map_err(|e| StoreError::Parse { path, reason: e.to_string() })?;
    Ok(file.state)
}

#[cfg(test)]
mod tests;
