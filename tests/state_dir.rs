//! The `[state]` directory belongs to one vipgated at a time: a second one
//! on it (with its own API socket, so the socket does not stop it first)
//! fails before EAL starts, naming the directory and the running one's pid;
//! and the temporary files an interrupted write leaves are removed at the
//! next start, under the lock.

use std::time::{Duration, Instant};
use vipgate::NullGateway;

/// Waits (bounded) until the gateway answers on its API socket.
fn wait_ready(gw: &mut NullGateway) {
    gw.wait_ready(|g| g.ctl(&["health"]).status.success());
}

#[test]
fn a_second_gateway_on_the_same_state_directory_fails_before_eal() {
    let mut first = NullGateway::builder("sd1").build();
    first.spawn();
    wait_ready(&mut first);
    let state_dir = first.dir().join("state");

    // Another gateway in every way (socket, file prefix, ports) but the
    // state directory.
    let mut second = NullGateway::builder("sd2").build();
    let config = std::fs::read_to_string(second.config_path()).unwrap();
    let own = second.dir().join("state").display().to_string();
    assert!(config.contains(&own), "{config}");
    std::fs::write(second.config_path(), config.replace(&own, &state_dir.display().to_string())).unwrap();
    second.spawn();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = second.try_wait() {
            break status;
        }
        assert!(Instant::now() < deadline, "the second vipgated still runs:\n{}", second.log_text());
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = second.log_text();
    assert!(!status.success(), "the second vipgated exited {status}:\n{log}");
    let want = format!(
        "state directory {}: in use by another vipgated (pid {}, holding vipgated.lock)",
        state_dir.display(),
        first.pid()
    );
    assert!(log.contains(&want), "wanted {want:?} in:\n{log}");
    assert!(!log.contains("initialising EAL"), "the second vipgated reached EAL:\n{log}");
    eprintln!("the second vipgated: {}", log.lines().find(|l| l.contains(&want)).unwrap());

    // The first is untouched, and its directory is free once it stops.
    assert_eq!(first.ctl(&["health"]).status.code(), Some(0));
    assert!(first.stop().success(), "{}", first.log_text());
    second.spawn();
    wait_ready(&mut second);
    assert!(second.stop().success(), "{}", second.log_text());
}

#[test]
fn temporary_state_files_left_by_a_kill_are_removed_at_the_next_start() {
    let mut gw = NullGateway::builder("sdt").build();
    let state_dir = gw.dir().join("state");
    std::fs::create_dir_all(&state_dir).unwrap();
    // What a vipgated killed inside a write leaves (an earlier version's
    // rewrite of state.json; this version's making of a new database), and
    // what is not its.
    let leftovers = [state_dir.join(".state.json.4242.tmp"), state_dir.join("state.redb.new")];
    std::fs::write(&leftovers[0], "{\"format\": 1, \"sta").unwrap();
    std::fs::write(&leftovers[1], "half a database").unwrap();
    let other = state_dir.join("notes.tmp");
    std::fs::write(&other, "kept").unwrap();
    gw.spawn();
    wait_ready(&mut gw);
    let log = gw.log_text();
    for leftover in &leftovers {
        assert!(!leftover.exists(), "{} is still there:\n{log}", leftover.display());
        let want = format!("removed a temporary state file an interrupted write left path={}", leftover.display());
        assert!(log.contains(&want), "wanted {want:?} in:\n{log}");
    }
    assert!(other.exists(), "a file not vipgated's was removed");
    assert!(state_dir.join("state.redb").exists(), "the database was made");
    assert!(gw.stop().success(), "{}", gw.log_text());
}
