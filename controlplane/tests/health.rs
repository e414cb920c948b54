//! Health-check probes against real listeners on loopback: a TCP listener,
//! an HTTP server, an HTTPS server with a self-signed certificate, a UDP
//! echo; a listener that accepts but never answers (timeouts), wrong
//! statuses and wrong UDP replies. Then the checker end to end: probe tasks
//! on a runtime, the rise/fall state machine, and targets that follow the
//! desired state.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, UdpSocket};
use vipgate_controlplane::health::probe::probe;
use vipgate_controlplane::health::{Checker, HealthCheck, HealthCheckInput, HealthStatus, Target, TargetKey};

const LOCAL: Ipv4Addr = Ipv4Addr::LOCALHOST;

fn check(kind: &str, f: impl FnOnce(&mut HealthCheckInput)) -> HealthCheck {
    let mut input = HealthCheckInput {
        kind: Some(kind.to_owned()),
        interval_ms: Some(1000),
        timeout_ms: Some(300),
        ..HealthCheckInput::default()
    };
    f(&mut input);
    input.validate().expect("a valid check")
}

fn addr_of(l: &TcpListener) -> SocketAddrV4 {
    match l.local_addr().unwrap() {
        std::net::SocketAddr::V4(a) => a,
        other => panic!("{other}"),
    }
}

/// What the HTTP server saw of each request: path, Host, User-Agent.
type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

/// Answers `/status/N` with status N, anything else with 200; records each
/// request.
async fn answer(req: Request<Incoming>, seen: Seen) -> Result<Response<Full<Bytes>>, Infallible> {
    let header = |name: hyper::header::HeaderName| {
        req.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
    };
    let path = req.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
    seen.lock().unwrap().push((path.clone(), header(hyper::header::HOST), header(hyper::header::USER_AGENT)));
    let status = path.strip_prefix("/status/").and_then(|s| s.parse::<u16>().ok()).unwrap_or(200);
    let mut r = Response::new(Full::new(Bytes::from_static(b"ok\n")));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    Ok(r)
}

/// An HTTP/1 server on loopback; with `tls`, behind a self-signed
/// certificate for "backend.test".
async fn http_server(tls: bool) -> (SocketAddrV4, Seen, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
    let addr = addr_of(&listener);
    let seen: Seen = Arc::default();
    let acceptor = tls.then(|| {
        let cert = rcgen::generate_simple_self_signed(vec!["backend.test".to_owned()]).unwrap();
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    let s = Arc::clone(&seen);
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let seen = Arc::clone(&s);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| answer(req, Arc::clone(&seen)));
                let http = hyper::server::conn::http1::Builder::new();
                let _ = match acceptor {
                    Some(a) => match a.accept(stream).await {
                        Ok(tls) => http.serve_connection(TokioIo::new(tls), service).await,
                        Err(_) => return,
                    },
                    None => http.serve_connection(TokioIo::new(stream), service).await,
                };
            });
        }
    });
    (addr, seen, task)
}

#[tokio::test]
async fn tcp_connect_passes_on_a_listener_and_fails_when_refused() {
    let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
    let addr = addr_of(&listener);
    probe(&check("tcp", |_| {}), addr).await.expect("a listener accepts");
    drop(listener);
    let e = probe(&check("tcp", |_| {}), addr).await.expect_err("nothing listens");
    assert!(e.contains("connect") && e.contains("refused"), "{e}");
}

#[tokio::test]
async fn tcp_probes_leave_from_the_source_address_and_a_foreign_one_fails() {
    let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
    let addr = addr_of(&listener);
    let from = |s: &str| check("tcp", |i| i.source = Some(s.to_owned()));
    let loopback2 = from("127.0.0.2");
    let (accepted, ok) = tokio::join!(listener.accept(), probe(&loopback2, addr));
    ok.expect("127.0.0.2 is a loopback address");
    assert_eq!(accepted.unwrap().1.ip(), std::net::IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
    // An address of no interface here (TEST-NET-2, never assigned by tests).
    let e = probe(&from("198.51.100.77"), addr).await.expect_err("not a local address");
    assert!(e.contains("cannot bind the source address 198.51.100.77"), "{e}");
}

#[tokio::test]
async fn http_get_sends_path_host_and_user_agent_and_checks_the_status() {
    let (addr, seen, server) = http_server(false).await;
    probe(&check("http", |i| i.path = Some("/healthz?full=1".into())), addr).await.expect("200 is in 200-399");
    probe(&check("http", |i| i.path = Some("/status/301".into())), addr).await.expect("301 is in 200-399");
    let e = probe(&check("http", |i| i.path = Some("/status/503".into())), addr).await.expect_err("503");
    assert_eq!(e, "HTTP status 503, expected 200-399");
    // An explicit list: 301 passes, 200 does not.
    let moved = |p: &str| {
        let p = p.to_owned();
        check("http", move |i| {
            i.path = Some(p);
            i.expect_status = Some("204,301-302".into());
            i.host = Some("web.example:8080".into());
        })
    };
    probe(&moved("/status/302"), addr).await.expect("302 is listed");
    let e = probe(&moved("/"), addr).await.expect_err("200 is not listed");
    assert_eq!(e, "HTTP status 200, expected 204,301-302");
    let seen = seen.lock().unwrap().clone();
    let ua = vipgate_controlplane::health::probe::USER_AGENT;
    assert_eq!(seen[0], ("/healthz?full=1".to_owned(), addr.to_string(), ua.to_owned()));
    assert_eq!(seen[3], ("/status/302".to_owned(), "web.example:8080".to_owned(), ua.to_owned()));
    assert_eq!(seen.len(), 5);
    server.abort();
}

#[tokio::test]
async fn https_get_passes_without_verifying_the_certificate_and_checks_the_status() {
    let (addr, seen, server) = http_server(true).await;
    probe(&check("https", |_| {}), addr).await.expect("self-signed, for another name, and still up");
    probe(&check("https", |i| i.host = Some("backend.test".into())), addr).await.expect("with SNI");
    let e = probe(&check("https", |i| i.path = Some("/status/500".into())), addr).await.expect_err("500");
    assert_eq!(e, "HTTP status 500, expected 200-399");
    assert_eq!(seen.lock().unwrap().len(), 3, "every probe reached the server through TLS");
    // Plain HTTP against the TLS port: no HTTP answer.
    let e = probe(&check("http", |_| {}), addr).await.expect_err("TLS port");
    assert!(e.starts_with("HTTP") || e.starts_with("no answer"), "{e}");
    // TLS against a plain HTTP server fails the handshake.
    let (plain, _, plain_server) = http_server(false).await;
    let e = probe(&check("https", |_| {}), plain).await.expect_err("no TLS there");
    assert!(e.starts_with("TLS handshake"), "{e}");
    server.abort();
    plain_server.abort();
}

#[tokio::test]
async fn a_listener_that_never_answers_times_out() {
    // Connections complete in the kernel's backlog; nothing ever reads.
    let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
    let addr = addr_of(&listener);
    let c = check("http", |i| i.timeout_ms = Some(150));
    let start = Instant::now();
    let e = probe(&c, addr).await.expect_err("no answer");
    let took = start.elapsed();
    assert_eq!(e, "no answer within 150 ms");
    assert!(took >= Duration::from_millis(150) && took < Duration::from_millis(1000), "{took:?}");
    drop(listener);
    // No checked backend: no health families at all.
    let none = vipgate_controlplane::metrics::render(Arc::new(HealthOnly(Arc::new(HealthStatus::default()))));
    assert!(!none.contains("vipgate_backend_health") && !none.contains("vipgate_health_probes"), "{none}");
}

/// A UDP server that answers each datagram with `reply` (or echoes it when
/// `reply` is empty), or never answers when `silent`.
async fn udp_server(reply: &'static [u8], silent: bool) -> (SocketAddrV4, tokio::task::JoinHandle<()>) {
    let socket = UdpSocket::bind((LOCAL, 0)).await.unwrap();
    let addr = match socket.local_addr().unwrap() {
        std::net::SocketAddr::V4(a) => a,
        other => panic!("{other}"),
    };
    let task = tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        loop {
            let (n, peer) = socket.recv_from(&mut buf).await.unwrap();
            if silent {
                continue;
            }
            let out = if reply.is_empty() { &buf[..n] } else { reply };
            socket.send_to(out, peer).await.unwrap();
        }
    });
    (addr, task)
}

#[tokio::test]
async fn udp_request_and_reply() {
    let udp = |expect: Option<&[u8]>| {
        let expect = expect.map(<[u8]>::to_vec);
        check("udp", move |i| {
            i.payload = Some(b"ping\x00\xff".to_vec());
            i.expect_reply = expect;
            i.timeout_ms = Some(200);
        })
    };
    let (echo, echo_task) = udp_server(b"", false).await;
    probe(&udp(None), echo).await.expect("any reply");
    probe(&udp(Some(b"ping")), echo).await.expect("the echo starts with ping");
    let e = probe(&udp(Some(b"pong")), echo).await.expect_err("wrong reply");
    assert!(e.contains("does not start with the expected \"pong\""), "{e}");

    let (silent, silent_task) = udp_server(b"", true).await;
    assert_eq!(probe(&udp(None), silent).await.expect_err("silent"), "no answer within 200 ms");

    // Nothing bound: the kernel answers with ICMP port unreachable.
    let closed = {
        let s = std::net::UdpSocket::bind((LOCAL, 0)).unwrap();
        match s.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            other => panic!("{other}"),
        }
    };
    assert_eq!(probe(&udp(None), closed).await.expect_err("closed"), "UDP: port unreachable (ICMP)");
    echo_task.abort();
    silent_task.abort();
}

fn key(service: &str, addr: SocketAddrV4) -> TargetKey {
    TargetKey { service: service.to_owned(), address: *addr.ip(), port: addr.port() }
}

/// Waits for the next transition of the checker, feeding it reports.
async fn next_transition(
    checker: &mut Checker,
    reports: &mut tokio::sync::mpsc::UnboundedReceiver<vipgate_controlplane::health::ProbeReport>,
    within: Duration,
) -> vipgate_controlplane::health::Transition {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let r = tokio::time::timeout_at(deadline, reports.recv())
            .await
            .expect("a transition in time")
            .expect("the checker is alive");
        if let Some(t) = checker.report(r) {
            return t;
        }
    }
}

#[tokio::test]
async fn the_checker_takes_a_failing_backend_down_within_fall_intervals_and_back_after_rise() {
    let listener = std::net::TcpListener::bind((LOCAL, 0)).unwrap();
    let addr = match listener.local_addr().unwrap() {
        std::net::SocketAddr::V4(a) => a,
        other => panic!("{other}"),
    };
    let c = check("tcp", |i| {
        i.interval_ms = Some(100);
        i.timeout_ms = Some(50);
        i.rise = Some(3);
        i.fall = Some(2);
    });
    let status = Arc::new(HealthStatus::default());
    let (mut checker, mut reports) = Checker::new(Arc::clone(&status));
    let k = key("web", addr);
    let plan = checker.plan(vec![Target { key: k.clone(), check: Some(c.clone()) }]);
    assert!(plan.down().is_empty(), "at start every backend is up");
    checker.apply(plan);
    assert_eq!(checker.is_up(&k), Some(true));

    // Up and passing: a few probes, no transition.
    tokio::time::sleep(Duration::from_millis(350)).await;
    while let Ok(r) = reports.try_recv() {
        assert!(checker.report(r).is_none(), "a passing backend stays up");
    }
    let before = status.get(&k).unwrap();
    assert!(before.up && before.probes_ok >= 2 && before.probes_failed == 0, "{before:?}");

    drop(listener);
    let stopped = Instant::now();
    let t = next_transition(&mut checker, &mut reports, Duration::from_secs(2)).await;
    let took = stopped.elapsed();
    assert!(!t.up && t.key == k && t.reason.contains("refused"), "{t:?}");
    // fall (2) x interval (100 ms), plus scheduling slack on a loaded
    // 2-CPU machine.
    assert!(took <= Duration::from_millis(200 + 300), "down after {took:?}");
    assert_eq!(checker.down(), HashSet::from([k.clone()]));
    let down = status.get(&k).unwrap();
    assert!(!down.up && down.probes_failed >= 2 && down.last_failure.contains("refused"), "{down:?}");

    let _again = std::net::TcpListener::bind(addr).expect("the same port again");
    let back = Instant::now();
    let t = next_transition(&mut checker, &mut reports, Duration::from_secs(2)).await;
    let took = back.elapsed();
    assert!(t.up && t.reason == "3 successful probes in a row", "{t:?}");
    // rise (3) x interval (100 ms): not before the third probe, and with
    // the same slack as above.
    assert!(took >= Duration::from_millis(180) && took <= Duration::from_millis(300 + 300), "up after {took:?}");
    assert!(checker.down().is_empty());
}

#[tokio::test]
async fn targets_follow_the_desired_state_and_keep_their_health() {
    let broken = std::net::TcpListener::bind((LOCAL, 0)).unwrap();
    let dead = match broken.local_addr().unwrap() {
        std::net::SocketAddr::V4(a) => a,
        other => panic!("{other}"),
    };
    drop(broken);
    let alive_listener = std::net::TcpListener::bind((LOCAL, 0)).unwrap();
    let alive = match alive_listener.local_addr().unwrap() {
        std::net::SocketAddr::V4(a) => a,
        other => panic!("{other}"),
    };
    let c = check("tcp", |i| {
        i.interval_ms = Some(100);
        i.timeout_ms = Some(50);
        i.fall = Some(3);
    });
    let target = |k: &TargetKey, c: Option<&HealthCheck>| Target { key: k.clone(), check: c.cloned() };
    let status = Arc::new(HealthStatus::default());
    let (mut checker, mut reports) = Checker::new(Arc::clone(&status));
    let (d, a) = (key("web", dead), key("web", alive));
    let unchecked = key("other", alive);
    checker.apply(checker.plan(vec![target(&d, Some(&c)), target(&unchecked, None)]));
    // At start, up; the first failure decides at once.
    let t = next_transition(&mut checker, &mut reports, Duration::from_secs(1)).await;
    assert!(!t.up && t.key == d, "{t:?}");

    // A new backend after start begins down; the dead one stays down (its
    // task and counts are untouched); the unchecked one gets a check and,
    // having forwarded already, begins up.
    let plan = checker.plan(vec![target(&d, Some(&c)), target(&a, Some(&c)), target(&unchecked, Some(&c))]);
    assert_eq!(plan.down(), &HashSet::from([d.clone(), a.clone()]));
    let failed_before = status.get(&d).unwrap().probes_failed;
    checker.apply(plan);
    assert_eq!((checker.is_up(&a), checker.is_up(&unchecked)), (Some(false), Some(true)));
    let t = next_transition(&mut checker, &mut reports, Duration::from_secs(1)).await;
    assert!(t.up && t.key == a && t.reason == "the first probe passed", "first success decides: {t:?}");
    let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
    while let Ok(Some(r)) = tokio::time::timeout_at(deadline, reports.recv()).await {
        assert!(checker.report(r).is_none(), "nothing else changes");
    }
    assert!(status.get(&d).unwrap().probes_failed > failed_before, "the dead target kept counting");

    // A changed check keeps the health; a removed target stops and leaves
    // the status.
    let slower = HealthCheck { interval_ms: 200, ..c.clone() };
    checker.apply(checker.plan(vec![target(&d, Some(&slower)), target(&a, Some(&c))]));
    assert_eq!((checker.is_up(&d), checker.is_up(&a), checker.is_up(&unchecked)), (Some(false), Some(true), None));
    assert!(status.get(&unchecked).is_none());
    assert_eq!(checker.len(), 2);
    // Reports still queued from the removed target are ignored.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(r) = reports.try_recv() {
        assert!(checker.report(r).is_none(), "no transition: the removed target's reports are ignored");
    }
    drop(alive_listener);
}

/// A gateway with no worker and no port, and a health checker.
struct HealthOnly(Arc<HealthStatus>);

impl vipgate_controlplane::api::GatewayView for HealthOnly {
    fn workers(&self) -> Vec<vipgate_controlplane::api::WorkerView> {
        vec![]
    }
    fn ports(&self) -> Vec<vipgate_controlplane::api::PortView> {
        vec![]
    }
    fn mempool(&self) -> vipgate_controlplane::api::MempoolView {
        vipgate_controlplane::api::MempoolView::default()
    }
    fn serving(&self) -> bool {
        true
    }
    fn health(&self) -> Option<Arc<HealthStatus>> {
        Some(Arc::clone(&self.0))
    }
}

#[tokio::test]
async fn metrics_show_each_checked_backends_health_and_probe_counts() {
    let listener = std::net::TcpListener::bind((LOCAL, 0)).unwrap();
    let alive = match listener.local_addr().unwrap() {
        std::net::SocketAddr::V4(a) => a,
        other => panic!("{other}"),
    };
    let dead = {
        let l = std::net::TcpListener::bind((LOCAL, 0)).unwrap();
        match l.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            other => panic!("{other}"),
        }
    };
    let c = check("tcp", |i| {
        i.interval_ms = Some(100);
        i.timeout_ms = Some(50);
    });
    let status = Arc::new(HealthStatus::default());
    let (mut checker, mut reports) = Checker::new(Arc::clone(&status));
    let (a, d) = (key("web", alive), key("web", dead));
    checker.apply(checker.plan(vec![
        Target { key: a.clone(), check: Some(c.clone()) },
        Target { key: d.clone(), check: Some(c.clone()) },
    ]));
    // Exactly two reports of each are counted.
    let (mut ok, mut failed) = (0, 0);
    while ok < 2 || failed < 2 {
        let r = tokio::time::timeout(Duration::from_secs(2), reports.recv()).await.unwrap().unwrap();
        let counted = if r.key == a { &mut ok } else { &mut failed };
        if *counted < 2 {
            *counted += 1;
            checker.report(r);
        }
    }
    let text = vipgate_controlplane::metrics::render(Arc::new(HealthOnly(Arc::clone(&status))));
    let (al, dl) = (format!("backend=\"{alive}\""), format!("backend=\"{dead}\""));
    for want in [
        "# TYPE vipgate_backend_health gauge".to_owned(),
        format!("vipgate_backend_health{{service=\"web\",{al},check=\"tcp\"}} 1"),
        format!("vipgate_backend_health{{service=\"web\",{dl},check=\"tcp\"}} 0"),
        "# TYPE vipgate_health_probes counter".to_owned(),
        format!("vipgate_health_probes_total{{service=\"web\",{al},check=\"tcp\",result=\"success\"}} 2"),
        format!("vipgate_health_probes_total{{service=\"web\",{al},check=\"tcp\",result=\"failure\"}} 0"),
        format!("vipgate_health_probes_total{{service=\"web\",{dl},check=\"tcp\",result=\"success\"}} 0"),
        format!("vipgate_health_probes_total{{service=\"web\",{dl},check=\"tcp\",result=\"failure\"}} 2"),
    ] {
        assert!(text.lines().any(|l| l == want), "no line {want:?} in\n{text}");
    }
    drop(listener);
    // No checked backend: no health families at all.
    let none = vipgate_controlplane::metrics::render(Arc::new(HealthOnly(Arc::new(HealthStatus::default()))));
    assert!(!none.contains("vipgate_backend_health") && !none.contains("vipgate_health_probes"), "{none}");
}
