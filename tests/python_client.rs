//! The gRPC API from another toolchain: generates a Python client from
//! proto/vipgate/v1/*.proto with grpcio-tools (`python -m grpc_tools.protoc`,
//! into a temporary directory; generated code is never committed) and runs
//! tests/python/vipgate_client.py with it against a vipgated on net_null
//! ports. The script calls Gateway and ServiceManager over the Unix socket,
//! prints one line per step and exits non-zero on any mismatch.
//!
//! Needs root, hugepages (or VIPGATE_HUGEPAGES=0) and the Python venv that
//! scripts/setup.sh creates (/opt/vipgate/python, or the interpreter named
//! by VIPGATE_PYTHON); fails loudly, never skips, without them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use vipgate::{NullGateway, repo_root, require_root};

/// The venv scripts/setup.sh creates (its VIPGATE_PYTHON_VENV default).
const DEFAULT_VENV: &str = "/opt/vipgate/python";

fn python() -> PathBuf {
    match std::env::var_os("VIPGATE_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => Path::new(DEFAULT_VENV).join("bin/python3"),
    }
}

fn install_hint() -> String {
    format!(
        "run scripts/setup.sh as root (it creates the venv {DEFAULT_VENV} with pinned grpcio, grpcio-tools and \
         protobuf from PyPI), or point VIPGATE_PYTHON at a python3 that can `import grpc, grpc_tools.protoc`. \
         Debian's python3-grpc-tools 1.14 is not enough: its protoc predates proto3 `optional`."
    )
}

/// vipgated in a temporary directory, its API up, with [`NullGateway`]'s
/// base configuration (one static service "web"); dropping it kills the daemon and removes its files (kept after a
/// failure, for the log).
fn start_daemon() -> NullGateway {
    let mut d = NullGateway::builder("py").build();
    d.spawn();
    d.wait_ready(|d| d.socket().exists());
    d
}

/// SIGTERM, a clean exit within 20 s and every mbuf back in the pool.
fn stop(d: &mut NullGateway) -> String {
    let status = d.stop();
    let log = d.log_text();
    assert!(status.success(), "vipgated exited with {status}:\n{log}");
    assert!(log.contains("mbuf pool at shutdown: 0 in use"), "mbufs leaked:\n{log}");
    log
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Generates the Python modules (messages and gRPC stubs) of every
/// proto/vipgate/v1/*.proto into `out` with grpc_tools.protoc.
fn generate(py: &Path, out: &Path) {
    let check = Command::new(py).args(["-c", "import grpc, grpc_tools.protoc, google.protobuf"]).output();
    match check {
        Err(e) => panic!("cannot run {}: {e}\n{}", py.display(), install_hint()),
        Ok(o) if !o.status.success() => panic!(
            "{} cannot import grpcio/grpcio-tools:\n{}\n{}",
            py.display(),
            String::from_utf8_lossy(&o.stderr).trim_end(),
            install_hint()
        ),
        Ok(_) => {}
    }
    let proto_root = repo_root().join("proto");
    let mut protos: Vec<PathBuf> = std::fs::read_dir(proto_root.join("vipgate/v1"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    protos.sort();
    assert!(protos.len() >= 2, "expected gateway.proto and services.proto, found {protos:?}");
    let out_dir = out.display().to_string();
    let o = Command::new(py)
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", proto_root.display()))
        .arg(format!("--python_out={out_dir}"))
        .arg(format!("--grpc_python_out={out_dir}"))
        .args(&protos)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "grpc_tools.protoc failed ({}):\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    for m in ["gateway_pb2.py", "gateway_pb2_grpc.py", "services_pb2.py", "services_pb2_grpc.py"] {
        assert!(out.join("vipgate/v1").join(m).exists(), "grpc_tools.protoc did not write vipgate/v1/{m}");
    }
}

#[test]
fn a_python_client_generated_by_grpcio_tools_drives_vipgated() {
    require_root();
    let started = Instant::now();
    let py = python();
    let gen_dir = TempDir(std::env::temp_dir().join(format!("vgpy-gen{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&gen_dir.0);
    std::fs::create_dir_all(&gen_dir.0).unwrap();
    generate(&py, &gen_dir.0);

    let mut d = start_daemon();
    let script = repo_root().join("tests/python/vipgate_client.py");
    let mut cmd = Command::new(&py);
    cmd.arg(&script)
        .arg("--socket")
        .arg(format!("unix:{}", d.socket().display()))
        .env("PYTHONPATH", &gen_dir.0)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("PYTHONHOME")
        .stdin(Stdio::null());
    // Keep the client from trying a proxy for a Unix socket.
    for v in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "grpc_proxy", "all_proxy", "ALL_PROXY"] {
        cmd.env_remove(v);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{}", stdout.trim_end());
    if !stderr.trim().is_empty() {
        println!("stderr:\n{}", stderr.trim_end());
    }
    assert!(
        out.status.success(),
        "{} exited with {}:\n{stdout}{stderr}\nvipgated's log:\n{}",
        script.display(),
        out.status,
        d.log_text()
    );
    assert!(stdout.lines().any(|l| l.starts_with("ok all:")), "the script did not finish:\n{stdout}");

    let log = stop(&mut d);
    let line = log.lines().find_map(|l| l.find("mbuf pool at shutdown").map(|i| &l[i..])).unwrap_or_default();
    println!("vipgated stopped: {line}");
    println!("elapsed: {:.1} s", started.elapsed().as_secs_f64());
}
