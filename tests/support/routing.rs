//! Routing daemons for the end-to-end tests of route announcement: FRR
//! (zebra, bfdd, bgpd) and BIRD 2 run inside a network namespace with every
//! socket, pid file and log in a directory of the test's own, so that tests
//! running in parallel never share one; the examples of docs/examples/ with
//! their placeholders replaced; network namespaces deleted on drop.
//!
//! FRR must be installed in /usr/lib/frr and BIRD 2 as `bird`
//! (scripts/setup.sh installs both); a test that needs one fails loudly,
//! saying so, when it is missing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::repo_root;

/// Runs a command (`cmd[0]` with the rest as arguments) and returns its
/// output, whatever its status.
pub fn run(cmd: &[&str]) -> Output {
    Command::new(cmd[0]).args(&cmd[1..]).stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// Runs a command that must succeed and returns its stdout; panics with
/// both outputs otherwise.
pub fn ok(cmd: &[&str]) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace the test creates, deleted on drop (with what is
/// left in it).
pub struct Netns {
    /// Its name.
    pub name: String,
}

impl Netns {
    /// Creates `name` afresh (deleting one left over) with `lo` up.
    pub fn new(name: String) -> Netns {
        let _ = run(&["ip", "netns", "del", &name]);
        ok(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ok(&["ip", "-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside.
    pub fn exec(&self, cmd: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(cmd);
        run(&full)
    }

    /// The IPv4 addresses on `dev` (`a.b.c.d/len`), or `None` if there is
    /// no such interface.
    pub fn addresses(&self, dev: &str) -> Option<BTreeSet<String>> {
        let out = run(&["ip", "-n", &self.name, "-j", "-4", "addr", "show", "dev", dev]);
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
        Some(
            v.as_array()
                .into_iter()
                .flatten()
                .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
                .map(|a| format!("{}/{}", a["local"].as_str().unwrap_or("?"), a["prefixlen"]))
                .collect(),
        )
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

/// Reads an example from docs/examples and replaces its placeholders;
/// panics if one is left (the example and the test disagree).
pub fn example(name: &str, values: &[(&str, &str)]) -> String {
    example_repeating(name, values, ("", &[]))
}

/// [`example`], where each line holding the placeholder `repeat.0` comes
/// once per value of `repeat.1`, with the placeholder replaced by it (a
/// line per peer, say).
pub fn example_repeating(name: &str, values: &[(&str, &str)], repeat: (&str, &[&str])) -> String {
    let path = repo_root().join("docs/examples").join(name);
    let mut text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if !repeat.0.is_empty() {
        assert!(text.contains(repeat.0), "{name} has no placeholder {}", repeat.0);
        text = text
            .lines()
            .flat_map(|l| match l.contains(repeat.0) {
                true => repeat.1.iter().map(|v| l.replace(repeat.0, v)).collect::<Vec<_>>(),
                false => vec![l.to_owned()],
            })
            .map(|l| l + "\n")
            .collect();
    }
    for (k, v) in values {
        assert!(text.contains(k), "{name} has no placeholder {k}");
        text = text.replace(k, v);
    }
    let left: Vec<&str> = text.lines().filter(|l| !l.trim_start().starts_with(['!', '#']) && l.contains('@')).collect();
    assert!(left.is_empty(), "{name}: placeholders left: {left:?}");
    text
}

/// The gateways' AS, in every test that runs the examples.
pub const GATEWAY_AS: &str = "65001";
/// The routers' AS, in every test that runs the examples.
pub const ROUTER_AS: &str = "65000";
/// The prefix the VIPs come from, in every test that runs the examples.
pub const VIP_RANGE: &str = "198.18.100.0/22";

/// docs/examples/frr.conf for the gateway `hostname` with router id
/// `router_id`, peering with the router `upstream`; its BACKENDS peer group
/// listens on `backend_net`.
pub fn gateway_frr_conf(hostname: &str, router_id: &str, upstream: &str, backend_net: &str) -> String {
    example(
        "frr.conf",
        &[
            ("@HOSTNAME@", hostname),
            ("@ROUTER_ID@", router_id),
            ("@LOCAL_AS@", GATEWAY_AS),
            ("@UPSTREAM_AS@", ROUTER_AS),
            ("@UPSTREAM@", upstream),
            ("@VIP_RANGE@", VIP_RANGE),
            ("@BACKEND_NET@", backend_net),
        ],
    )
}

/// docs/examples/bird.conf for the gateway with router id `router_id`,
/// peering with the router `upstream`.
pub fn gateway_bird_conf(router_id: &str, upstream: &str) -> String {
    example(
        "bird.conf",
        &[
            ("@ROUTER_ID@", router_id),
            ("@LOCAL_AS@", GATEWAY_AS),
            ("@UPSTREAM_AS@", ROUTER_AS),
            ("@UPSTREAM@", upstream),
            ("@VIP_RANGE@", VIP_RANGE),
        ],
    )
}

/// docs/examples/upstream-frr.conf for the router `router_id`, with a
/// `neighbor` line per gateway of `gateways`.
pub fn router_frr_conf(router_id: &str, gateways: &[&str]) -> String {
    example_repeating(
        "upstream-frr.conf",
        &[
            ("@HOSTNAME@", "router"),
            ("@ROUTER_ID@", router_id),
            ("@LOCAL_AS@", ROUTER_AS),
            ("@GATEWAY_AS@", GATEWAY_AS),
            ("@VIP_RANGE@", VIP_RANGE),
        ],
        ("@GATEWAY@", gateways),
    )
}

/// A child process killed (and reaped) on drop.
pub struct Daemon {
    name: String,
    child: Child,
}

impl Daemon {
    /// Spawns `command` with stdin from /dev/null and stdout and stderr to
    /// the file `out`; `name` is for messages.
    pub fn spawn(name: &str, command: &mut Command, out: &Path) -> Daemon {
        let out = std::fs::File::create(out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Daemon { name: name.to_owned(), child }
    }

    /// Panics, with `out`'s text, if the process has exited.
    pub fn assert_running(&mut self, out: &Path) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited ({status}): {}", self.name, std::fs::read_to_string(out).unwrap_or_default());
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `done` every 50 ms; panics, naming `what`, if it is still false
/// after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// zebra, bgpd and bfdd in a namespace, with their own vty sockets, zserv
/// socket, pid files and logs in `dir` (so they collide with nothing), as
/// the `frr` user Debian's package creates; configured with `vtysh -f`.
pub struct Frr {
    dir: PathBuf,
    daemons: Vec<Daemon>,
}

impl Frr {
    /// Starts zebra, bfdd and bgpd in `ns`, files in `dir`, and loads
    /// `config` with vtysh.
    pub fn start(ns: &str, dir: PathBuf, config: &str) -> Frr {
        for d in ["zebra", "bgpd", "bfdd"] {
            assert!(
                Path::new("/usr/lib/frr").join(d).exists(),
                "/usr/lib/frr/{d} is missing: install FRR (scripts/setup.sh installs the frr package)"
            );
        }
        std::fs::create_dir_all(&dir).unwrap();
        ok(&["chown", "frr:frr", dir.to_str().unwrap()]);
        let conf = dir.join("frr.conf");
        std::fs::write(&conf, config).unwrap();
        let mut frr = Frr { dir: dir.clone(), daemons: Vec::new() };
        // In frrinit's order, each waited for: zebra and its zserv socket
        // first (a client that finds no zebra retries only after seconds,
        // and bgpd does not register its BFD sessions again), then bfdd,
        // then bgpd.
        for d in ["zebra", "bfdd", "bgpd"] {
            let p = |f: &str| dir.join(f).to_str().unwrap().to_owned();
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns])
                .arg(format!("/usr/lib/frr/{d}"))
                .args(["--vty_socket", &p("")])
                .args(["-z", &p("zserv.api")])
                .args(["-i", &p(&format!("{d}.pid"))])
                .args(["-f", "/dev/null", "-P", "0"])
                .arg(format!("--log=file:{}", p(&format!("{d}.log"))));
            if d == "bfdd" {
                c.args(["--bfdctl", &p("bfdd.sock")]);
            }
            if d == "bgpd" {
                // Listen on the namespace's addresses only (the default).
                c.args(["-p", "179"]);
            }
            frr.daemons.push(Daemon::spawn(d, &mut c, &dir.join(format!("{d}.out"))));
            for sock in [format!("{d}.vty")].into_iter().chain((d == "zebra").then(|| "zserv.api".to_owned())) {
                let sock = dir.join(sock);
                wait_for(&format!("{d}'s socket {}", sock.display()), Duration::from_secs(20), || {
                    frr.assert_running();
                    sock.exists()
                });
            }
        }
        ok(&["vtysh", "--vty_socket", dir.to_str().unwrap(), "-f", conf.to_str().unwrap()]);
        frr
    }

    /// Panics, with its output, if one of the daemons has exited.
    pub fn assert_running(&mut self) {
        for d in &mut self.daemons {
            let out = self.dir.join(format!("{}.out", d.name));
            d.assert_running(&out);
        }
    }

    /// Runs one vtysh command; it must succeed.
    pub fn vtysh(&self, command: &str) -> String {
        ok(&["vtysh", "--vty_socket", self.dir.to_str().unwrap(), "-c", command])
    }

    /// The BGP routes in the routing table.
    pub fn bgp_routes(&self) -> BTreeSet<String> {
        let v: serde_json::Value = serde_json::from_str(&self.vtysh("show ip route bgp json")).expect("vtysh json");
        v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
    }

    /// The BGP session, BFD and bgpd's log, for a failure message (a
    /// session reset, by BFD on an overloaded machine say, shows there).
    pub fn diagnostics(&self) -> String {
        let tail = |name: &str| {
            let log = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
            let lines: Vec<&str> = log.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
            lines.join("\n")
        };
        format!(
            "{}\n{}\nbgpd.log:\n{}\nbfdd.log:\n{}",
            self.vtysh("show bgp summary"),
            self.vtysh("show bfd peers"),
            tail("bgpd.log"),
            tail("bfdd.log")
        )
    }

    /// BFD peers whose session is up.
    pub fn bfd_up(&self) -> BTreeSet<String> {
        let v: serde_json::Value = serde_json::from_str(&self.vtysh("show bfd peers json")).expect("vtysh json");
        v.as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["status"] == "up")
            .filter_map(|p| p["peer"].as_str().map(str::to_owned))
            .collect()
    }
}

/// BIRD 2 in a namespace, with its own control socket and pid file.
pub struct Bird {
    socket: PathBuf,
    _daemon: Daemon,
}

impl Bird {
    /// Starts `bird -f` in `ns` on `config`, files in `dir`.
    pub fn start(ns: &str, dir: PathBuf, config: &str) -> Bird {
        assert!(
            Command::new("bird").arg("--version").output().is_ok(),
            "bird is missing: install BIRD 2 (scripts/setup.sh installs the bird2 package)"
        );
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("bird.conf");
        std::fs::write(&conf, config).unwrap();
        let socket = dir.join("bird.ctl");
        let out = dir.join("bird.out");
        let mut daemon = Daemon::spawn(
            "bird",
            Command::new("ip")
                .args(["netns", "exec", ns, "bird", "-f", "-c"])
                .arg(&conf)
                .arg("-s")
                .arg(&socket)
                .arg("-P")
                .arg(dir.join("bird.pid")),
            &out,
        );
        wait_for("BIRD's control socket", Duration::from_secs(20), || {
            daemon.assert_running(&out);
            socket.exists()
        });
        Bird { socket, _daemon: daemon }
    }

    /// Runs one birdc command; it must succeed.
    pub fn birdc(&self, command: &str) -> String {
        let mut cmd = vec!["birdc", "-s", self.socket.to_str().unwrap()];
        cmd.extend(command.split(' '));
        ok(&cmd)
    }

    /// Whether the BFD session with `peer` is up.
    pub fn bfd_up(&self, peer: &str) -> bool {
        self.birdc("show bfd sessions").lines().any(|l| l.starts_with(peer) && l.contains(" Up "))
    }
}
