use super::*;
use crate::state::{
    AdminState, AffinityState, BackendState, ModeState, NewFlowLimitState, PoolState, ProtocolState, RemovalState,
    ServiceState, SourceRange,
};

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vipgate-store-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn service(name: &str, last: u8, weight: u32) -> ServiceState {
    ServiceState {
        name: name.to_owned(),
        vip: std::net::Ipv4Addr::new(198, 18, 100, last),
        port: 80,
        protocol: ProtocolState::Tcp,
        mode: ModeState::Nat,
        table_size: 251,
        on_backend_removal: RemovalState::Reset,
        backends: vec![BackendState {
            address: "198.18.1.20".parse().unwrap(),
            port: 8080,
            weight,
            admin_state: AdminState::Draining,
        }],
        health_check: None,
        new_flow_limit: None,
        source_ranges: Vec::new(),
        affinity: Default::default(),
        owner: "k8s/prod".to_owned(),
    }
}

fn pool(name: &str) -> PoolState {
    PoolState {
        name: name.to_owned(),
        addresses: vec!["198.18.1.100".parse().unwrap()],
        first_port: 1024,
        last_port: 65535,
        owner: "cli".to_owned(),
    }
}

fn sample(version: u64) -> DesiredState {
    let mut s = DesiredState { version, ..DesiredState::default() };
    let mut web = service("web", 5, 3);
    web.health_check = Some(
        crate::health::HealthCheckInput {
            kind: Some("udp".into()),
            payload: Some(vec![0, 1, 0xff]),
            expect_reply: Some(b"ok".to_vec()),
            interval_ms: Some(1000),
            ..Default::default()
        }
        .validate()
        .unwrap(),
    );
    web.new_flow_limit = Some(NewFlowLimitState { per_second: 50, burst: 80, prefix_len: 28 });
    web.source_ranges = vec![SourceRange::parse("203.0.113.0/24").unwrap(), SourceRange::parse("0.0.0.0/0").unwrap()];
    web.affinity = AffinityState::ClientIp;
    s.services.insert("web".to_owned(), web);
    s.services.insert("api".to_owned(), service("api", 6, 1));
    s.source_pools.insert("snat".to_owned(), pool("snat"));
    s
}

/// A state of `n` services, each its own record.
fn many(n: u32) -> DesiredState {
    let mut s = DesiredState { version: 9, ..DesiredState::default() };
    for i in 0..n {
        let name = format!("svc-{i:05}");
        s.services.insert(name.clone(), service(&name, (i % 250) as u8, i));
    }
    s
}

/// Opens the store in `d` under its lock, as vipgated does; the lock is
/// released on return.
fn open(d: &Path) -> Result<(Store, DesiredState), StoreError> {
    let store = Store::new(d);
    let lock = store.lock()?;
    let state = store.open(&lock)?;
    Ok((store, state))
}

fn names(d: &Path) -> Vec<String> {
    let mut n: Vec<String> =
        std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    n.sort();
    n
}

fn legacy_text(state: &DesiredState) -> String {
    serde_json::to_string(&serde_json::json!({ "format": 1, "state": state })).unwrap()
}

/// Writes `state.json` as an earlier vipgated did.
fn write_legacy(d: &Path, state: &DesiredState) -> String {
    std::fs::create_dir_all(d).unwrap();
    let text = legacy_text(state);
    std::fs::write(d.join(LEGACY_FILE_NAME), &text).unwrap();
    text
}

#[test]
fn a_new_directory_gets_an_empty_database_and_nothing_else() {
    let d = dir("new");
    let (store, state) = open(&d).unwrap();
    assert_eq!(state, DesiredState::default());
    assert_eq!(names(&d), [FILE_NAME, LOCK_FILE_NAME]);
    drop(store);
    let (_store, state) = open(&d).unwrap();
    assert_eq!(state, DesiredState::default());
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn commits_write_what_the_change_names_and_a_restart_reads_it_back() {
    let d = dir("commit");
    let (store, _) = open(&d).unwrap();
    let mut state = sample(1);
    store.commit(&state, &Change::between("Apply", &DesiredState::default(), &state)).unwrap();
    // One service changed, one deleted, a pool added.
    let before = state.clone();
    state.version = 2;
    state.services.get_mut("web").unwrap().backends[0].weight = 7;
    state.services.remove("api");
    state.source_pools.insert("more".to_owned(), pool("more"));
    let change = Change::between("Apply", &before, &state);
    assert_eq!(store.batch(&state, &change).unwrap().len(), 3);
    store.commit(&state, &change).unwrap();
    drop(store);
    assert_eq!(open(&d).unwrap().1, state);

    // Only the named records are written: a service changed in memory but
    // not named keeps its stored record (the version moves on).
    let (store, _) = open(&d).unwrap();
    let mut next = state.clone();
    next.version = 3;
    next.services.get_mut("web").unwrap().port = 81;
    next.source_pools.remove("more");
    let mut change = Change::default();
    change.pools_deleted.push("more".to_owned());
    store.commit(&next, &change).unwrap();
    drop(store);
    let (_, read) = open(&d).unwrap();
    assert_eq!(read.version, 3);
    assert_eq!(read.services, state.services);
    assert_eq!(read.source_pools, next.source_pools);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn names_without_a_record_delete_nothing_and_replace_all_replaces_everything() {
    let d = dir("replace");
    let (store, _) = open(&d).unwrap();
    let state = sample(4);
    store.replace_all(&state).unwrap();
    // A reload's change names the file's (static) services: the dynamic
    // state changed its version only.
    let reloaded = DesiredState { version: 5, ..state.clone() };
    let change = Change {
        cause: "reload".to_owned(),
        services_changed: vec!["static-a".to_owned()],
        services_deleted: vec!["static-b".to_owned()],
        ..Change::default()
    };
    store.commit(&reloaded, &change).unwrap();
    drop(store);
    assert_eq!(open(&d).unwrap().1, reloaded);

    let (store, _) = open(&d).unwrap();
    let mut other = DesiredState { version: 6, ..DesiredState::default() };
    other.services.insert("new".to_owned(), service("new", 9, 2));
    store.replace_all(&other).unwrap();
    drop(store);
    assert_eq!(open(&d).unwrap().1, other);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn the_meta_record_holds_every_field_but_the_two_maps() {
    let state = sample(42);
    let rest: serde_json::Value = serde_json::from_slice(&rest_json(&state).unwrap()).unwrap();
    let mut whole = serde_json::to_value(&state).unwrap();
    let object = whole.as_object_mut().unwrap();
    for key in rest::SKIPPED {
        assert!(object.remove(key).is_some(), "{key} is a field of the state");
    }
    assert_eq!(rest, whole);
    assert_eq!(rest, serde_json::json!({ "version": 42 }));
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
    let (store, _) = open(&d).unwrap();
    store.replace_all(&sample(2)).unwrap();
    drop(store);
    for name in [".state.json.4242.tmp", ".state.json.17.tmp"] {
        std::fs::write(d.join(name), "{\"format\": 1, \"sta").unwrap();
    }
    std::fs::write(d.join(NEW_FILE_NAME), "half a database").unwrap();
    let kept = ["notes.tmp", ".state.json.tmp", ".state.json.x1.tmp", "state.json.5.tmp", ".vipgated.5.tmp"];
    for name in kept {
        std::fs::write(d.join(name), "x").unwrap();
    }
    assert_eq!(open(&d).unwrap().1, sample(2));
    let mut want: Vec<String> = kept.iter().chain(&[FILE_NAME, LOCK_FILE_NAME]).map(|s| (*s).to_owned()).collect();
    want.sort();
    assert_eq!(names(&d), want);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn state_json_is_migrated_once_and_kept_as_a_backup() {
    let d = dir("migrate");
    let state = sample(17);
    let text = write_legacy(&d, &state);
    let (store, read) = open(&d).unwrap();
    assert_eq!(read, state);
    assert_eq!(names(&d), [MIGRATED_FILE_NAME, FILE_NAME, LOCK_FILE_NAME]);
    assert_eq!(std::fs::read_to_string(d.join(MIGRATED_FILE_NAME)).unwrap(), text);
    // Commits go to the database; a restart reads them, and the backup is
    // left as it was.
    let next = DesiredState { version: 18, ..state.clone() };
    store.commit(&next, &Change::default()).unwrap();
    drop(store);
    let (_, again) = open(&d).unwrap();
    assert_eq!(again, next);
    assert_eq!(names(&d), [MIGRATED_FILE_NAME, FILE_NAME, LOCK_FILE_NAME]);
    assert_eq!(std::fs::read_to_string(d.join(MIGRATED_FILE_NAME)).unwrap(), text);
    std::fs::remove_dir_all(&d).unwrap();
}

/// A complete database holding `state`, made in another directory, as the
/// migration would make it.
fn database_bytes(tag: &str, state: &DesiredState) -> Vec<u8> {
    let d = dir(tag);
    write_legacy(&d, state);
    drop(open(&d).unwrap());
    let bytes = std::fs::read(d.join(FILE_NAME)).unwrap();
    std::fs::remove_dir_all(&d).unwrap();
    bytes
}

#[test]
fn a_migration_interrupted_at_any_step_is_finished_by_the_next_start() {
    let state = sample(23);
    let complete = database_bytes("migrate-src", &state);
    // What a kill leaves after each step: the files besides state.json,
    // and whether state.json is still there.
    type Files<'a> = &'a [(&'a str, &'a [u8])];
    let steps: [(&str, Files, bool); 5] = [
        ("before anything", &[], true),
        ("inside step 2 (state.redb.new half written)", &[(NEW_FILE_NAME, &complete[..complete.len() / 2])], true),
        ("after step 2 (state.redb.new complete)", &[(NEW_FILE_NAME, &complete)], true),
        ("after step 3 (state.redb in place)", &[(FILE_NAME, &complete)], true),
        ("after step 4 (done)", &[(FILE_NAME, &complete)], false),
    ];
    for (step, files, legacy) in steps {
        let d = dir("migrate-step");
        let text = write_legacy(&d, &state);
        if !legacy {
            std::fs::rename(d.join(LEGACY_FILE_NAME), d.join(MIGRATED_FILE_NAME)).unwrap();
        }
        for (name, bytes) in files {
            std::fs::write(d.join(name), bytes).unwrap();
        }
        let (_, read) = open(&d).unwrap_or_else(|e| panic!("{step}: {e}"));
        assert_eq!(read, state, "{step}");
        assert_eq!(names(&d), [MIGRATED_FILE_NAME, FILE_NAME, LOCK_FILE_NAME], "{step}");
        assert_eq!(std::fs::read_to_string(d.join(MIGRATED_FILE_NAME)).unwrap(), text, "{step}");
        // And again: nothing left to do.
        assert_eq!(open(&d).unwrap().1, state, "{step}: restart");
        assert_eq!(names(&d), [MIGRATED_FILE_NAME, FILE_NAME, LOCK_FILE_NAME], "{step}: restart");
        std::fs::remove_dir_all(&d).unwrap();
    }
}

#[test]
fn a_state_json_put_back_beside_a_different_database_stops_the_start() {
    let d = dir("conflict");
    write_legacy(&d, &sample(3));
    let (store, _) = open(&d).unwrap();
    store.commit(&sample(4), &Change::default()).unwrap();
    drop(store);
    std::fs::copy(d.join(MIGRATED_FILE_NAME), d.join(LEGACY_FILE_NAME)).unwrap();
    let e = open(&d).unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }), "{e:?}");
    let text = e.to_string();
    println!("{text}");
    assert!(text.contains(&format!("remove {}", d.join(LEGACY_FILE_NAME).display())), "{text}");
    assert!(d.join(LEGACY_FILE_NAME).exists() && d.join(FILE_NAME).exists(), "both left for the operator");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_corrupt_state_json_is_an_error_naming_it_and_is_left_in_place() {
    let d = dir("corrupt-json");
    std::fs::create_dir_all(&d).unwrap();
    let path = d.join(LEGACY_FILE_NAME);
    for (text, want) in [
        ("{\"format\": 1, \"state\": {\"version\": 3, \"serv", "not valid JSON"),
        ("{\"format\": 2, \"state\": {}}", "format 2 is not supported"),
        ("{\"state\": {}}", "no \"format\" number"),
        ("{\"format\": 1, \"state\": {\"version\": \"x\", \"services\": {}, \"source_pools\": {}}}", "invalid type"),
    ] {
        std::fs::write(&path, text).unwrap();
        let e = open(&d).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains(want), "wanted {want:?} in {e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        assert!(!d.join(FILE_NAME).exists(), "no database made from it");
    }
    std::fs::remove_dir_all(&d).unwrap();
}

/// Asserts that opening `d` fails as damaged, with a reason containing
/// `want`, names the file and the way back, and leaves the file as it was
/// (byte for byte if `unchanged`: a file redb opens, it also commits to).
fn assert_damaged(d: &Path, what: &str, want: &str, unchanged: bool) {
    let path = d.join(FILE_NAME);
    let bytes = std::fs::read(&path).unwrap();
    let e = open(d).unwrap_err();
    let text = e.to_string();
    println!("{what}: {text}");
    assert!(matches!(e, StoreError::Damaged { .. }), "{what}: {e:?}");
    assert!(text.starts_with(&format!("state file {}: ", path.display())), "{what}: {text}");
    assert!(text.contains(want), "{what}: wanted {want:?} in {text}");
    assert!(
        text.contains(&format!(
            "To recover: move {} away, start vipgated (with no dynamic services), and restore the last export with `vipgatectl state import FILE`",
            path.display()
        )),
        "{what}: {text}"
    );
    if unchanged {
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "{what}: the file was changed");
    } else {
        assert!(matches!(open(d), Err(StoreError::Damaged { .. })), "{what}: the next start too");
    }
}

/// A directory whose database holds [`many`] (and was closed cleanly).
fn stored(tag: &str, n: u32) -> (PathBuf, DesiredState) {
    let d = dir(tag);
    let state = many(n);
    let (store, _) = open(&d).unwrap();
    store.replace_all(&state).unwrap();
    drop(store);
    (d, state)
}

#[test]
fn a_truncated_or_garbage_database_is_refused_naming_it_and_the_way_back() {
    let (d, _) = stored("truncated", 300);
    let path = d.join(FILE_NAME);
    let len = std::fs::metadata(&path).unwrap().len();
    for cut in [len / 2, 4096, 100, 0] {
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(cut).unwrap();
        drop(f);
        assert_damaged(&d, &format!("truncated to {cut} of {len} bytes"), "redb cannot open it", true);
    }
    let garbage: Vec<u8> = (0..100_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&path, garbage).unwrap();
    assert_damaged(&d, "garbage", "redb cannot open it", true);
    std::fs::write(&path, legacy_text(&sample(1))).unwrap();
    assert_damaged(&d, "a JSON file", "redb cannot open it", true);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_flipped_byte_in_a_record_is_found_by_the_integrity_check() {
    let (d, _) = stored("flipped", 300);
    let path = d.join(FILE_NAME);
    let mut bytes = std::fs::read(&path).unwrap();
    // A digit of a record in the middle of the state: still valid JSON,
    // only the page's checksum tells.
    let needle = br#""name":"svc-00150","vip":"198.18.100.150""#;
    let at = bytes.windows(needle.len()).position(|w| w == needle).expect("the record is in the file");
    assert_eq!(bytes.windows(needle.len()).filter(|w| *w == needle).count(), 1);
    let digit = at + needle.len() - 2;
    bytes[digit] = b'7';
    println!("flipped byte {digit} of {}", bytes.len());
    std::fs::write(&path, &bytes).unwrap();
    assert_damaged(&d, "a flipped byte", "redb cannot open it", true);
    std::fs::remove_dir_all(&d).unwrap();
}

/// Changes the database in `d` through redb itself (the pages' checksums
/// stay right).
fn tamper(d: &Path, f: impl FnOnce(&redb::WriteTransaction)) {
    let db = Database::open(d.join(FILE_NAME)).unwrap();
    let tx = db.begin_write().unwrap();
    f(&tx);
    tx.commit().unwrap();
}

#[test]
fn records_that_do_not_decode_and_unknown_formats_are_refused() {
    type Case = (&'static str, fn(&redb::WriteTransaction), &'static str);
    let cases: [Case; 7] = [
        (
            "a service record with bad JSON",
            |tx| {
                drop(tx.open_table(SERVICES).unwrap().insert("svc-00007", b"{\"name\": \"svc-00007\", \"vi".as_slice()))
            },
            "the service \"svc-00007\" record: EOF while parsing",
        ),
        (
            "a service record under another name",
            |tx| {
                let other = serde_json::to_vec(&service("other", 1, 1)).unwrap();
                drop(tx.open_table(SERVICES).unwrap().insert("svc-00007", other.as_slice()));
            },
            "the service \"svc-00007\" record is named \"other\"",
        ),
        (
            "a pool record of the wrong shape",
            |tx| drop(tx.open_table(POOLS).unwrap().insert("p", b"{\"name\": \"p\"}".as_slice())),
            "the source pool \"p\" record: missing field",
        ),
        (
            "an unknown format",
            |tx| drop(tx.open_table(META).unwrap().insert(META_FORMAT, b"3".as_slice())),
            "format 3 is not supported (this vipgated reads format 2)",
        ),
        ("no format", |tx| drop(tx.open_table(META).unwrap().remove(META_FORMAT)), "no format record"),
        (
            "a state record with an unknown field",
            |tx| drop(tx.open_table(META).unwrap().insert(META_STATE, b"{\"version\": 1, \"x\": 2}".as_slice())),
            "the state record: unknown field `x`",
        ),
        ("no meta table", |tx| assert!(tx.delete_table(META).unwrap()), "no meta table"),
    ];
    for (what, f, want) in cases {
        let (d, _) = stored("records", 20);
        tamper(&d, f);
        assert_damaged(&d, what, want, false);
        std::fs::remove_dir_all(&d).unwrap();
    }
}

/// Sets or clears the immutable attribute of `path` (as root, permissions
/// would not make a write fail).
fn immutable(path: &Path, on: bool) {
    let out = std::process::Command::new("chattr").arg(if on { "+i" } else { "-i" }).arg(path).output();
    let out = out.expect("chattr (e2fsprogs) runs");
    assert!(
        out.status.success(),
        "chattr on {} failed (needs root and a file system with the immutable attribute): {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn after_a_failed_write_the_next_one_writes_the_whole_state() {
    let (d, mut state) = stored("failed", 50);
    let (store, read) = open(&d).unwrap();
    assert_eq!(read, state);
    let path = d.join(FILE_NAME);
    immutable(&path, true);
    let before = state.clone();
    state.version += 1;
    state.services.get_mut("svc-00001").unwrap().port = 81;
    let change = Change::between("UpdateService", &before, &state);
    let e = store.commit(&state, &change).unwrap_err();
    println!("{e}");
    assert!(matches!(e, StoreError::Write { .. }), "{e:?}");
    immutable(&path, false);
    // The daemon keeps the state it had; its next change may name other
    // records: the write covers the whole state all the same.
    let mut next = before.clone();
    next.version += 1;
    next.services.remove("svc-00002");
    let change = Change::between("DeleteService", &before, &next);
    let batch = store.batch(&next, &change).unwrap();
    assert_eq!(batch.len(), next.services.len(), "the whole state");
    store.write(batch).unwrap();
    // And then changes only again.
    let mut last = next.clone();
    last.version += 1;
    last.services.remove("svc-00003");
    let change = Change::between("DeleteService", &next, &last);
    assert_eq!(store.batch(&last, &change).unwrap().len(), 1);
    store.commit(&last, &change).unwrap();
    drop(store);
    assert_eq!(open(&d).unwrap().1, last);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_change_batch_is_refused_while_the_whole_state_must_be_written() {
    let (d, state) = stored("resync", 5);
    let (store, _) = open(&d).unwrap();
    store.inner.resync.store(true, Ordering::Release);
    let batch = Batch::of_change(&state, &Change::default()).unwrap();
    let e = store.write(batch).unwrap_err().to_string();
    assert!(e.contains("the whole state must be written first"), "{e}");
    store.replace_all(&state).unwrap();
    store.commit(&state, &Change::default()).unwrap();
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_service_record_from_before_source_ranges_and_affinity_loads_with_their_defaults() {
    let (d, mut want) = stored("old-record", 3);
    // A record as earlier vipgated versions wrote it: neither field.
    let old = br#"{"name":"svc-00001","vip":"198.18.100.1","port":80,"protocol":"tcp","mode":{"kind":"nat"},
        "table_size":251,"on_backend_removal":"rehash","backends":[{"address":"198.18.1.20","port":8080,
        "weight":1,"admin_state":"enabled"}],"owner":"cli"}"#;
    tamper(&d, |tx| drop(tx.open_table(SERVICES).unwrap().insert("svc-00001", old.as_slice())));
    let (_, read) = open(&d).unwrap();
    let svc = &read.services["svc-00001"];
    assert!(svc.source_ranges.is_empty());
    assert_eq!(svc.affinity, AffinityState::None);
    assert_eq!(svc.backends[0].address, std::net::Ipv4Addr::new(198, 18, 1, 20));
    // The other records are as written.
    want.services.remove("svc-00001");
    let mut rest = read.services.clone();
    rest.remove("svc-00001");
    assert_eq!(rest, want.services);
    // A service without them is still written without them, so an earlier
    // vipgated reads it back.
    let text = serde_json::to_string(svc).unwrap();
    assert!(!text.contains("source_ranges") && !text.contains("affinity"), "{text}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_stored_source_range_with_host_bits_is_damage() {
    let (d, _) = stored("bad-range", 3);
    let mut svc = service("svc-00001", 1, 1);
    svc.source_ranges = vec![SourceRange::parse("10.0.0.0/8").unwrap()];
    let text = serde_json::to_string(&svc).unwrap().replace("10.0.0.0/8", "10.0.0.1/8");
    tamper(&d, |tx| drop(tx.open_table(SERVICES).unwrap().insert("svc-00001", text.as_bytes())));
    assert_damaged(&d, "a bad source range", "\"10.0.0.1/8\" has host bits set", false);
    std::fs::remove_dir_all(&d).unwrap();
}
