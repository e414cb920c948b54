//! The API over TCP with mutual TLS: `serve_tcp` with a fake gateway, a
//! throwaway CA and certificates made by rcgen at test time (no key is ever
//! committed), called through `vipgatectl --endpoint` and a raw tonic
//! client.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use tokio::sync::oneshot;
use vipgate_controlplane::api::{self, GatewayView, MempoolView, PortView, WorkerView, pb};
use vipgate_dataplane::counters::WorkerCounters;

struct OneWorker;

impl GatewayView for OneWorker {
    fn workers(&self) -> Vec<WorkerView> {
        vec![WorkerView {
            lcore: 1,
            counters: Arc::new(WorkerCounters::default()),
            snapshot: Arc::default(),
            since_last_loop: None,
        }]
    }
    fn ports(&self) -> Vec<PortView> {
        Vec::new()
    }
    fn mempool(&self) -> MempoolView {
        MempoolView { name: "pool".to_owned(), size: 1023, in_use: 0 }
    }
    fn serving(&self) -> bool {
        true
    }
}

/// A CA, a server certificate for 127.0.0.1 and localhost, a client
/// certificate signed by the CA and a self-signed one, as PEM files in a
/// directory removed on drop.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("vgtls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();

        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "vipgate test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        write("ca.pem", ca.self_signed(&ca_key).unwrap().pem());
        let issuer = Issuer::new(ca, ca_key);

        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, cn: &str| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(names).unwrap();
            p.distinguished_name.push(DnType::CommonName, cn);
            p.extended_key_usages = vec![usage];
            (p, key)
        };
        let (server, server_key) =
            leaf(vec!["127.0.0.1".to_owned(), "localhost".to_owned()], ExtendedKeyUsagePurpose::ServerAuth, "vipgated");
        write("server.pem", server.signed_by(&server_key, &issuer).unwrap().pem());
        write("server.key", server_key.serialize_pem());
        let (client, client_key) =
            leaf(vec!["vipgatectl".to_owned()], ExtendedKeyUsagePurpose::ClientAuth, "vipgatectl");
        write("client.pem", client.signed_by(&client_key, &issuer).unwrap().pem());
        write("client.key", client_key.serialize_pem());
        let (rogue, rogue_key) = leaf(vec!["vipgatectl".to_owned()], ExtendedKeyUsagePurpose::ClientAuth, "vipgatectl");
        write("rogue.pem", rogue.self_signed(&rogue_key).unwrap().pem());
        write("rogue.key", rogue_key.serialize_pem());
        Pki { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(name)).unwrap()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts `serve_tcp` on a free loopback port; returns its endpoint URL and
/// the sender that stops it.
fn start(pki: &Pki, max_request_bytes: usize) -> (String, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let bound = api::bind_tcp(api::TcpSettings {
        addr: "127.0.0.1:0".parse().unwrap(),
        cert_pem: pki.read("server.pem"),
        key_pem: pki.read("server.key"),
        client_ca_pem: pki.read("ca.pem"),
        max_request_bytes,
    })
    .unwrap();
    let endpoint = format!("https://{}", bound.local_addr());
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(async move {
        api::serve_tcp(bound, Arc::new(OneWorker), None, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    (endpoint, stop, task)
}

async fn vipgatectl(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_vipgatectl"))
            .args(&args)
            .env_remove("VIPGATE_SOCKET")
            .env_remove("VIPGATE_ENDPOINT")
            .output()
            .expect("run vipgatectl")
    })
    .await
    .unwrap()
}

fn ctl_args(endpoint: &str, pki: &Pki, cert: &str, key: &str, rest: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "--endpoint".into(),
        endpoint.into(),
        "--cert".into(),
        pki.path(cert),
        "--key".into(),
        pki.path(key),
        "--ca".into(),
        pki.path("ca.pem"),
    ];
    a.extend(rest.iter().map(|s| (*s).to_owned()));
    a
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn vipgatectl_with_a_client_certificate_from_the_ca_gets_health() {
    let pki = Pki::new("good");
    let (endpoint, stop, task) = start(&pki, 4 << 20);
    let out = vipgatectl(ctl_args(&endpoint, &pki, "client.pem", "client.key", &["--json", "health"])).await;
    println!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let health: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(health["status"], "SERVING");
    assert_eq!(health["workers"], 1);
    let out = vipgatectl(ctl_args(&endpoint, &pki, "client.pem", "client.key", &["--json", "stats"])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn a_self_signed_client_certificate_is_refused_at_the_handshake() {
    let pki = Pki::new("rogue");
    let (endpoint, stop, task) = start(&pki, 4 << 20);
    let out = vipgatectl(ctl_args(&endpoint, &pki, "rogue.pem", "rogue.key", &["health"])).await;
    let err = text(&out.stderr);
    println!("{err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    // TLS 1.3: the server's refusal arrives after the client's side of the
    // handshake, on the first call.
    assert!(
        err.contains(&format!("cannot connect to vipgated at {endpoint}"))
            || err.contains("vipgated closed the connection: is --cert signed by the CA in its [api] client_ca"),
        "{err}"
    );
    // No answer came through.
    assert!(out.stdout.is_empty());
    stop.send(()).unwrap();
    task.await.unwrap();
}

/// A client with no certificate: rustls on the server requires one, so the
/// handshake fails before any request.
#[tokio::test]
async fn a_client_without_a_certificate_is_refused_at_the_handshake() {
    let pki = Pki::new("nocert");
    let (endpoint, stop, task) = start(&pki, 4 << 20);
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(pki.read("ca.pem")));
    let connected =
        tonic::transport::Endpoint::from_shared(endpoint.clone()).unwrap().tls_config(tls).unwrap().connect().await;
    let refused = match connected {
        Err(e) => format!("connect: {e:?}"),
        // TLS 1.3 may finish the client's side of the handshake before the
        // server's refusal arrives: then the first call fails.
        Ok(channel) => {
            let mut client = pb::gateway_client::GatewayClient::new(channel);
            let status =
                client.get_health(pb::GetHealthRequest {}).await.expect_err("a call without a client certificate");
            format!("call: {status:?}")
        }
    };
    println!("{refused}");
    assert!(
        refused.contains("CertificateRequired")
            || refused.contains("certificate required")
            || refused.contains("Unavailable"),
        "{refused}"
    );
    // vipgatectl cannot even be asked without --cert: clap refuses.
    let out = vipgatectl(vec!["--endpoint".into(), endpoint, "health".into()]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    stop.send(()).unwrap();
    task.await.unwrap();
}

/// A request message with a large field the server's decoder never gets
/// to: the length prefix alone is over the limit.
#[derive(Clone, PartialEq, prost::Message)]
struct Padded {
    #[prost(bytes = "vec", tag = "15")]
    pad: Vec<u8>,
}

#[tokio::test]
async fn an_oversized_request_is_refused_with_out_of_range() {
    let pki = Pki::new("big");
    let limit = 64 * 1024;
    let (endpoint, stop, task) = start(&pki, limit);
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(pki.read("ca.pem")))
        .identity(tonic::transport::Identity::from_pem(pki.read("client.pem"), pki.read("client.key")));
    let channel =
        tonic::transport::Endpoint::from_shared(endpoint).unwrap().tls_config(tls).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/vipgate.v1.Gateway/GetHealth");
    let call = |size: usize| {
        let mut grpc = grpc.clone();
        let path = path.clone();
        async move {
            grpc.ready().await.unwrap();
            let codec = tonic_prost::ProstCodec::<Padded, pb::GetHealthResponse>::default();
            grpc.unary(tonic::Request::new(Padded { pad: vec![0; size] }), path, codec).await
        }
    };
    // Just under the limit: unknown fields are skipped, the call answers.
    let ok = call(limit - 16).await.expect("a request under the limit");
    assert_eq!(ok.get_ref().workers, 1);
    let status = call(limit + 1).await.expect_err("a request over the limit");
    println!("{:?}: {}", status.code(), status.message());
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("decoded message length too large"), "{status:?}");
    let _ = grpc.ready().await;
    stop.send(()).unwrap();
    task.await.unwrap();
}

/// Over the global rate limit, requests queue; past the connection's
/// concurrency limit, they are refused at once.
#[tokio::test]
async fn a_burst_over_the_rate_limit_is_refused_with_resource_exhausted() {
    let pki = Pki::new("burst");
    let (endpoint, stop, task) = start(&pki, 4 << 20);
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(pki.read("ca.pem")))
        .identity(tonic::transport::Identity::from_pem(pki.read("client.pem"), pki.read("client.key")));
    let channel =
        tonic::transport::Endpoint::from_shared(endpoint).unwrap().tls_config(tls).unwrap().connect().await.unwrap();
    let burst = 3 * api::RATE_LIMIT_PER_SECOND as usize;
    let calls: Vec<_> = (0..burst)
        .map(|_| {
            let mut client = pb::gateway_client::GatewayClient::new(channel.clone());
            tokio::spawn(async move { client.get_health(pb::GetHealthRequest {}).await.map(|_| ()) })
        })
        .collect();
    let (mut ok, mut refused, mut streams) = (0, 0, 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(()) => ok += 1,
            Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                assert_eq!(s.message(), "Too many active requests for the connection");
                refused += 1;
            }
            // Streams past MAX_CONCURRENT_STREAMS that the client opened
            // before it saw the server's SETTINGS: HTTP/2 REFUSED_STREAM.
            Err(s) if s.code() == tonic::Code::Unavailable && format!("{s:?}").contains("REFUSED_STREAM") => {
                streams += 1
            }
            Err(s) => panic!("unexpected status {s:?}"),
        }
    }
    println!(
        "{burst} calls at once: {ok} answered, {refused} refused with RESOURCE_EXHAUSTED, {streams} streams refused"
    );
    assert_eq!(ok + refused + streams, burst);
    assert!(refused > 0, "nothing was refused");
    // The first second's budget, then at most the connection's queue.
    let budget = api::RATE_LIMIT_PER_SECOND as usize + api::CONCURRENCY_PER_CONNECTION;
    assert!((api::RATE_LIMIT_PER_SECOND as usize..=budget + api::RATE_LIMIT_PER_SECOND as usize).contains(&ok), "{ok}");
    stop.send(()).unwrap();
    task.await.unwrap();
}
