//! One probe of one backend: a TCP connect, an HTTP(S) GET or a UDP
//! request, from the gateway's kernel, bounded by the check's timeout.
//!
//! Owns: the sockets and protocol exchanges of a probe and the words of a
//! failure. Must not keep state between probes or decide health: the
//! checker counts the outcomes.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

use crate::health_check::{CheckKind, HealthCheck, HttpCheck, UdpCheck};

/// The User-Agent of HTTP probes, so that backends can tell them from
/// clients in their logs.
pub const USER_AGENT: &str = concat!("vipgate-health/", env!("CARGO_PKG_VERSION"));

/// Why a probe failed, in words for the log, the API and `vipgatectl`.
pub type ProbeFailure = String;

/// Probes `target` once as `check` says. `Ok` is a success; the error says
/// what failed. Never takes longer than the check's timeout.
pub async fn probe(check: &HealthCheck, target: SocketAddrV4) -> Result<(), ProbeFailure> {
    let timeout = check.timeout();
    let exchange = async {
        match &check.kind {
            CheckKind::Tcp => connect(check.source, target).await.map(drop),
            CheckKind::Http(h) => http_get(h, connect(check.source, target).await?, target).await,
            CheckKind::Https(h) => {
                let tcp = connect(check.source, target).await?;
                let tls = tls_handshake(h, tcp, target).await?;
                http_get(h, tls, target).await
            }
            CheckKind::Udp(u) => udp_exchange(u, check.source, target).await,
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(outcome) => outcome,
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

async fn connect(source: Option<Ipv4Addr>, target: SocketAddrV4) -> Result<TcpStream, ProbeFailure> {
    let socket = TcpSocket::new_v4().map_err(|e| format!("cannot create a TCP socket: {e}"))?;
    if let Some(src) = source {
        socket.bind(SocketAddr::from((src, 0))).map_err(|e| format!("cannot bind the source address {src}: {e}"))?;
    }
    let stream = socket.connect(target.into()).await.map_err(|e| format!("connect: {e}"))?;
    // A probe's few bytes go out at once.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

async fn http_get<S>(h: &HttpCheck, io: S, target: SocketAddrV4) -> Result<(), ProbeFailure>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let host = h.host.clone().unwrap_or_else(|| target.to_string());
    let request = hyper::Request::get(h.path.as_str())
        .header(hyper::header::HOST, host)
        .header(hyper::header::USER_AGENT, USER_AGENT)
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::new())
        .map_err(|e| format!("HTTP request: {e}"))?;
    let mut conn = std::pin::pin!(conn);
    let mut send = std::pin::pin!(sender.send_request(request));
    // The connection is driven until the response's head has arrived; the
    // body is not read, and dropping both closes the socket. With
    // `Connection: close` the connection may finish first, with the
    // response already delivered.
    let response = tokio::select! {
        biased;
        r = &mut send => r,
        c = &mut conn => match c {
            Ok(()) => send.await,
            Err(e) => return Err(format!("HTTP: {}", root(&e))),
        },
    }
    .map_err(|e| {
        if e.is_canceled() || e.is_incomplete_message() {
            "HTTP: the connection closed before a response".to_owned()
        } else {
            format!("HTTP: {}", root(&e))
        }
    })?;
    let status = response.status().as_u16();
    if h.expect_status.contains(status) {
        Ok(())
    } else {
        Err(format!("HTTP status {status}, expected {}", h.expect_status))
    }
}

/// The innermost cause: hyper's own text alone is often only "connection
/// error".
fn root(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text = format!("{text}: {c}");
        cause = c.source();
    }
    text
}

/// The TLS client of HTTPS probes: TLS 1.2 and 1.3 with ring, ALPN
/// `http/1.1`, and no certificate verification (see [`AnyCertificate`]).
fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    Arc::clone(CONFIG.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }))
}

async fn tls_handshake(
    h: &HttpCheck,
    tcp: TcpStream,
    target: SocketAddrV4,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ProbeFailure> {
    use rustls::pki_types::ServerName;
    // SNI: the Host header's name when it is a DNS name, else the address.
    let name = h
        .host
        .as_deref()
        .map(|host| {
            host.rsplit_once(':').map_or(host, |(name, port)| if port.parse::<u16>().is_ok() { name } else { host })
        })
        .and_then(|host| ServerName::try_from(host.to_owned()).ok())
        .unwrap_or_else(|| ServerName::IpAddress(std::net::IpAddr::V4(*target.ip()).into()));
    tokio_rustls::TlsConnector::from(tls_config())
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake: {}", root(&e)))
}

/// Accepts any server certificate. A health check asks whether the backend
/// serves, not who it is: backends behind a load balancer commonly carry
/// certificates for the service's name (or self-signed ones) that do not
/// match their own address. The handshake's signatures are still checked,
/// so the TLS stack itself is exercised.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

async fn udp_exchange(u: &UdpCheck, source: Option<Ipv4Addr>, target: SocketAddrV4) -> Result<(), ProbeFailure> {
    let local = SocketAddr::from((source.unwrap_or(Ipv4Addr::UNSPECIFIED), 0));
    let socket = UdpSocket::bind(local).await.map_err(|e| format!("cannot bind the UDP source {local}: {e}"))?;
    // Connected: only a datagram from the target is a reply, and an ICMP
    // port unreachable fails the probe at once.
    socket.connect(SocketAddr::from(target)).await.map_err(|e| format!("UDP connect: {e}"))?;
    socket.send(&u.payload).await.map_err(|e| format!("UDP send: {e}"))?;
    let mut buf = vec![0u8; 65_535];
    let n = socket.recv(&mut buf).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "UDP: port unreachable (ICMP)".to_owned(),
        _ => format!("UDP receive: {e}"),
    })?;
    match &u.expect_reply {
        Some(want) if !buf[..n].starts_with(want) => Err(format!(
            "UDP reply {:?} does not start with the expected {:?}",
            String::from_utf8_lossy(&buf[..n.min(64)]),
            String::from_utf8_lossy(want)
        )),
        _ => Ok(()),
    }
}

/// How long to wait for the next probe of a target: `interval` shortened by
/// up to a tenth, from `random`, so that targets probed together drift
/// apart and a detection never takes longer than `fall` intervals.
pub fn jittered(interval: Duration, random: u64) -> Duration {
    let tenth = interval / 10;
    let cut = tenth.mul_f64((random % 1_000_001) as f64 / 1_000_000.0);
    interval.saturating_sub(cut)
}

/// The delay before a target's first probe: anywhere in one interval, from
/// `random`, so that the targets of a start or a reload are spread over the
/// whole interval instead of probing in lock-step.
pub fn first_delay(interval: Duration, random: u64) -> Duration {
    interval.mul_f64((random % 1_000_001) as f64 / 1_000_001.0)
}

/// A pseudo-random number for jitter: a per-process random hash of `seed`.
pub fn random(seed: impl std::hash::Hash) -> u64 {
    use std::hash::BuildHasher;
    static STATE: OnceLock<std::hash::RandomState> = OnceLock::new();
    STATE.get_or_init(std::hash::RandomState::new).hash_one(seed)
}
