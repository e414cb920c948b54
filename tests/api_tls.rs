//! vipgated's API over TCP with mutual TLS, end to end: a daemon on
//! net_null ports with `[api] listen_tcp` on a free loopback port, a
//! throwaway CA and certificates made by rcgen at test time (never
//! committed), vipgatectl `--endpoint` and curl as the clients, and a
//! client that never reads its answer, which SIGTERM must cut.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use vipgate::{require_root, use_hugepages, workspace_bin};

/// Writes ca.pem, server.pem/.key (for 127.0.0.1), client.pem/.key (signed
/// by the CA) and rogue.pem/.key (self-signed) into `dir`.
fn make_pki(dir: &Path) {
    let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "vipgate test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    write("ca.pem", ca.self_signed(&ca_key).unwrap().pem());
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |name: &str, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec![name.to_owned()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![usage];
        (p, key)
    };
    let (server, key) = leaf("127.0.0.1", ExtendedKeyUsagePurpose::ServerAuth);
    write("server.pem", server.signed_by(&key, &issuer).unwrap().pem());
    write("server.key", key.serialize_pem());
    let (client, key) = leaf("vipgatectl", ExtendedKeyUsagePurpose::ClientAuth);
    write("client.pem", client.signed_by(&key, &issuer).unwrap().pem());
    write("client.key", key.serialize_pem());
    let (rogue, key) = leaf("vipgatectl", ExtendedKeyUsagePurpose::ClientAuth);
    write("rogue.pem", rogue.self_signed(&key).unwrap().pem());
    write("rogue.key", key.serialize_pem());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Daemon {
    child: Option<Child>,
    dir: PathBuf,
    prefix: String,
    log: PathBuf,
    endpoint: String,
}

impl Daemon {
    /// `tag` tells the daemons of this file's tests apart.
    fn start(tag: &str, max_request_bytes: usize) -> Daemon {
        require_root();
        let prefix = format!("vgtls{tag}{}", std::process::id());
        let dir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(&dir).unwrap();
        make_pki(&dir);
        let port = free_port();
        let d = dir.display();
        let config = format!(
            r#"[eal]
lcores = "0,1"
hugepages = {huge}
file_prefix = "{prefix}"

[dataplane]
idle_sleep_us = 50
mbufs = 4095

[api]
socket = "{d}/api.sock"
listen_tcp = "127.0.0.1:{port}"
tls_cert = "{d}/server.pem"
tls_key = "{d}/server.key"
client_ca = "{d}/ca.pem"
max_request_bytes = {max_request_bytes}

[metrics]
listen = ""

# Its own, so the daemons of this file's tests run side by side and never
# use the host's default state directory.
[state]
dir = "{d}/state"

[[ports]]
name = "a"
device = "net_null{prefix}a,no-rx=1"
addresses = ["198.18.0.1/24"]
kernel_interface = ""
"#,
            huge = use_hugepages()
        );
        let path = dir.join("vipgated.toml");
        std::fs::write(&path, config).unwrap();
        let log = dir.join("vipgated.log");
        let child = Command::new(workspace_bin("vipgated"))
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut daemon = Daemon { child: Some(child), dir, prefix, log, endpoint: format!("https://127.0.0.1:{port}") };
        let deadline = Instant::now() + Duration::from_secs(20);
        // Up once it serves: until its worker polls (it builds its tables
        // first) the gateway answers NOT_SERVING.
        let serving = |d: &Daemon| {
            let out = d.ctl("client", &["--json", "health"]);
            serde_json::from_slice::<serde_json::Value>(&out.stdout).is_ok_and(|h| h["status"] == "SERVING")
        };
        while !serving(&daemon) {
            assert!(Instant::now() < deadline, "the TCP API did not come up serving:\n{}", daemon.log_text());
            let exited = daemon.child.as_mut().unwrap().try_wait().unwrap();
            assert!(exited.is_none(), "vipgated exited early:\n{}", daemon.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
        daemon
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// vipgatectl over TCP presenting `<who>.pem` and `<who>.key`.
    fn ctl(&self, who: &str, args: &[&str]) -> Output {
        Command::new(workspace_bin("vipgatectl"))
            .args(["--endpoint", &self.endpoint])
            .args(["--cert", &self.file(&format!("{who}.pem")), "--key", &self.file(&format!("{who}.key"))])
            .args(["--ca", &self.file("ca.pem")])
            .args(args)
            .env_remove("VIPGATE_SOCKET")
            .output()
            .unwrap()
    }

    /// curl with HTTP/2 over TLS, trusting the test CA; `extra` adds a
    /// client certificate or a body.
    fn curl(&self, path: &str, extra: &[&str]) -> Output {
        Command::new("curl")
            .args([
                "-sS",
                "--http2",
                "--max-time",
                "10",
                "-D",
                "-",
                "-o",
                "/dev/null",
                "--cacert",
                &self.file("ca.pem"),
            ])
            .args(extra)
            .arg(format!("{}{path}", self.endpoint))
            .output()
            .expect("curl is installed")
    }

    fn stop(mut self) -> String {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        let log = self.log_text();
        assert!(status.success(), "exit {status:?}:\n{log}");
        assert!(log.contains("mbuf pool at shutdown: 0 in use (at start: 0)"), "{log}");
        log
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(Path::new("/var/run/dpdk").join(&self.prefix));
        if let Ok(d) = std::fs::read_dir("/dev/hugepages") {
            for f in d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(&self.prefix)) {
                let _ = std::fs::remove_file(f.path());
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn api_over_tcp_needs_a_client_certificate_from_the_ca_and_bounds_request_size() {
    let limit = 65_536;
    let d = Daemon::start("", limit);

    // The CA's client: health and stats.
    let out = d.ctl("client", &["--json", "health"]);
    println!("good client: {}", text(&out.stdout));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let health: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(health["status"], "SERVING");
    assert_eq!(health["ports"], 1);

    // A self-signed client certificate: refused by the TLS layer.
    let out = d.ctl("rogue", &["health"]);
    println!("self-signed client: {}", text(&out.stderr).trim());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty());
    let err = text(&out.stderr);
    assert!(err.contains("UnknownCA") || err.contains("vipgated closed the connection"), "{err}");

    // No client certificate at all (curl; vipgatectl insists on --cert).
    let out = d.curl("/vipgate.v1.Gateway/GetHealth", &[]);
    println!("no client certificate: curl exit {:?}: {}", out.status.code(), text(&out.stderr).trim());
    assert!(!out.status.success());
    assert!(!text(&out.stdout).contains("HTTP/2"), "got an HTTP answer without a certificate: {}", text(&out.stdout));
    let out = Command::new(workspace_bin("vipgatectl")).args(["--endpoint", &d.endpoint, "health"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));

    // A request over max_request_bytes: the 5-byte gRPC frame header (flag,
    // length) announcing a message one byte over the limit. The server
    // refuses on the length alone, before reading (or buffering) any of
    // the message, so the header is all curl sends; sending the whole
    // message races curl's upload against the server's early answer and
    // stream reset. controlplane/tests/tls.rs sends a whole message.
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(limit + 1).unwrap().to_be_bytes());
    let body = d.dir.join("big.grpc");
    std::fs::write(&body, &frame).unwrap();
    let cert = ["--cert", &d.file("client.pem"), "--key", &d.file("client.key")];
    let grpc = ["-H", "content-type: application/grpc", "-H", "te: trailers"];
    let data = format!("@{}", body.display());
    let args: Vec<&str> = cert.iter().chain(&grpc).copied().chain(["--data-binary", &data]).collect();
    let out = d.curl("/vipgate.v1.Gateway/GetHealth", &args);
    let head = text(&out.stdout);
    println!("oversized request: {}", head.trim());
    assert!(out.status.success(), "{}", text(&out.stderr));
    // 11 is OUT_OF_RANGE, tonic's code for a message over the decoding limit.
    assert!(head.contains("grpc-status: 11"), "{head}");
    // grpc-message is percent-encoded.
    assert!(head.contains("decoded%20message%20length%20too%20large"), "{head}");

    let log = d.stop();
    assert!(log.contains("API listening on TCP with mutual TLS"), "{log}");
}

/// A client over TCP that holds a call open and never reads the answer (a
/// stream window of 0) is cut after the API's grace period, as on the
/// socket (tests/api_shutdown.rs), and vipgated stops.
#[tokio::test]
async fn sigterm_cuts_a_tcp_call_whose_answer_is_never_read() {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    use vipgate_controlplane::api::pb;

    let mut d = Daemon::start("cut", 4 * 1024 * 1024);
    let read = |name: &str| std::fs::read(d.file(name)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .identity(Identity::from_pem(read("client.pem"), read("client.key")))
        .domain_name("127.0.0.1");
    let channel = Endpoint::from_shared(d.endpoint.clone())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .initial_stream_window_size(0)
        .connect()
        .await
        .expect("connect over TLS with a window of 0");
    let stuck = tokio::spawn(async move {
        pb::gateway_client::GatewayClient::new(channel).get_counters(pb::GetCountersRequest {}).await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!stuck.is_finished(), "the call with a window of 0 ended by itself: {:?}", stuck.await);

    let child = d.child.as_mut().unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = d.child.as_mut().unwrap().try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "vipgated did not stop within 10 s of SIGTERM:\n{}", d.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    d.child = None;
    let log = d.log_text();
    assert!(status.success(), "exit {status:?}:\n{log}");
    assert!(log.contains("API grace period ran out: closing 1 connection"), "no warning about the cut:\n{log}");
    let call = tokio::time::timeout(Duration::from_secs(5), stuck).await.expect("the held call ended").unwrap();
    assert!(call.is_err(), "the held call got an answer: {call:?}");
}
