//! vipgated stops on SIGTERM even while an API client holds a call open and
//! never reads its answer: the API gets a short grace period, then every
//! connection still open is cut and the shutdown goes on. Needs root and
//! hugepages (or VIPGATE_HUGEPAGES=0) and fails loudly without.

use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Endpoint, Uri};
use vipgate::{NULL_GATEWAY_READY_TIMEOUT, NullGateway};
use vipgate_controlplane::api::pb;
use vipgate_controlplane::api::pb::gateway_client::GatewayClient;

/// Well above the daemon's grace period for the API, well below the 20 s
/// the stuck client once kept it running.
const STOP_DEADLINE: Duration = Duration::from_secs(10);

#[tokio::test]
async fn sigterm_stops_the_daemon_while_a_client_never_reads_its_answer() {
    let mut d = NullGateway::builder("ashut").build();
    d.spawn();
    let socket = d.socket();
    let deadline = Instant::now() + NULL_GATEWAY_READY_TIMEOUT;
    while vipgate_controlplane::api::connect_unix(&socket).await.is_err() {
        assert!(Instant::now() < deadline, "vipgated's API did not come up:\n{}", d.log_text());
        d.assert_running();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A stream window of 0: the server can send the answer's headers but
    // never a byte of its body, so the call stays open on the server until
    // the connection goes. A client that stopped reading looks the same.
    let channel = Endpoint::from_static("http://vipgated")
        .initial_stream_window_size(0)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { UnixStream::connect(socket).await.map(TokioIo::new) }
        }))
        .await
        .expect("connect with a window of 0");
    let stuck = tokio::spawn(async move { GatewayClient::new(channel).get_counters(pb::GetCountersRequest {}).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!stuck.is_finished(), "the call with a window of 0 ended by itself: {:?}", stuck.await);

    d.signal(libc::SIGTERM);
    let signalled = Instant::now();
    let status = loop {
        if let Some(status) = d.try_wait() {
            break status;
        }
        assert!(
            signalled.elapsed() < STOP_DEADLINE,
            "vipgated did not stop within {STOP_DEADLINE:?} of SIGTERM while a call was held open:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = signalled.elapsed();
    let log = d.log_text();
    assert!(status.success(), "exit {status:?}:\n{log}");
    assert!(log.contains("mbuf pool at shutdown: 0 in use (at start: 0)"), "{log}");
    assert!(log.contains("API grace period ran out: closing 1 connection"), "no warning about the cut:\n{log}");
    // The held call ends with the connection, not with an answer.
    let call = tokio::time::timeout(Duration::from_secs(5), stuck).await.expect("the held call ended").unwrap();
    assert!(call.is_err(), "the held call got an answer: {call:?}");
    let cut = log.lines().find(|l| l.contains("API grace period ran out")).unwrap_or_default();
    eprintln!("stopped {took:?} after SIGTERM with a call held open:\n{cut}");
}
