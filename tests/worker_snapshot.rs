//! Each worker of a running vipgated reports the snapshot it forwards with
//! (`GetCounters` `WorkerCounters.snapshot`): after a ServiceManager call
//! returns version v, every worker reports v. vipgated runs on net_null
//! ports with two workers. Needs root and hugepages (or
//! VIPGATE_HUGEPAGES=0) and fails loudly without.

use std::time::{Duration, Instant};

use vipgate::{NULL_GATEWAY_READY_TIMEOUT, NULL_GATEWAY_STOP_TIMEOUT, NullGateway};
use vipgate_controlplane::api::pb;
use vipgate_controlplane::api::{connect_unix, connect_unix_services};

/// How long a worker may take to report a version. A busy worker loads the
/// snapshot every few microseconds and an idle one wakes every 50 µs; the
/// slack is for a loaded test machine.
const REPORT_TIMEOUT: Duration = Duration::from_secs(10);

fn service(name: &str, vip_last: u8, weight: u32) -> pb::Service {
    pb::Service {
        name: name.to_owned(),
        vip: format!("198.18.100.{vip_last}"),
        port: 80,
        protocol: "tcp".to_owned(),
        table_size: 251,
        backends: vec![pb::Backend {
            address: format!("198.18.1.{}", 20 + vip_last),
            port: 8080,
            weight: Some(weight),
            admin_state: pb::AdminState::Enabled.into(),
            ..pb::Backend::default()
        }],
        ..pb::Service::default()
    }
}

/// Polls GetCounters until every worker reports a loaded snapshot
/// (generation 0 means none yet) of `version` or later; returns what they
/// report. Panics with the last answer after
/// REPORT_TIMEOUT.
async fn reported(
    gw: &mut pb::gateway_client::GatewayClient<tonic::transport::Channel>,
    version: u64,
) -> Vec<pb::WorkerSnapshot> {
    let start = Instant::now();
    loop {
        let r = gw.get_counters(pb::GetCountersRequest {}).await.expect("GetCounters").into_inner();
        let s: Vec<pb::WorkerSnapshot> =
            r.workers.iter().map(|w| w.snapshot.expect("every worker has a snapshot record")).collect();
        if !s.is_empty() && s.iter().all(|s| s.generation > 0 && s.version >= version) {
            return s;
        }
        assert!(start.elapsed() < REPORT_TIMEOUT, "workers did not report version {version}: {s:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test]
async fn every_worker_reports_the_version_of_each_change() {
    let mut d = NullGateway::builder("ws").lcores("0@0,1@0,2@1").build();
    d.spawn();
    let deadline = Instant::now() + NULL_GATEWAY_READY_TIMEOUT;
    let (mut sm, mut gw) = loop {
        if let (Ok(mut sm), Ok(gw)) = (connect_unix_services(&d.socket()).await, connect_unix(&d.socket()).await)
            && sm.get_state(pb::GetStateRequest::default()).await.is_ok()
        {
            break (sm, gw);
        }
        assert!(Instant::now() < deadline, "vipgated's API did not come up:\n{}", d.log_text());
        d.assert_running();
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // At start: the snapshot of the persisted state (version 0).
    let first = reported(&mut gw, 0).await;
    assert_eq!(first.len(), 2, "two workers: {first:?}");
    assert!(first.iter().all(|s| s.version == 0 && s.generation == first[0].generation), "{first:?}");

    let mut last_generation = first[0].generation;
    let created = sm
        .create_service(pb::CreateServiceRequest { service: Some(service("a", 5, 1)), ..Default::default() })
        .await
        .expect("CreateService")
        .into_inner()
        .version;
    assert_eq!(created, 1);
    for (i, weight) in [2u32, 3, 4].into_iter().enumerate() {
        let version = sm
            .update_backend(pb::UpdateBackendRequest {
                service: "a".to_owned(),
                address: "198.18.1.25".to_owned(),
                port: 8080,
                weight: Some(weight),
                admin_state: pb::AdminState::Unspecified.into(),
                ..Default::default()
            })
            .await
            .expect("UpdateBackend")
            .into_inner()
            .version;
        assert_eq!(version, 2 + i as u64);
        let s = reported(&mut gw, version).await;
        // Nothing published after this call: exactly its version, and one
        // snapshot (generation) for both workers, newer than the last.
        assert!(s.iter().all(|x| x.version == version), "{s:?}");
        assert!(s.iter().all(|x| x.generation == s[0].generation && x.generation > last_generation), "{s:?}");
        last_generation = s[0].generation;
    }
    drop((sm, gw));
    // Waited for on the runtime, which still drives the connections, so
    // that they close and vipgated's graceful shutdown does not wait.
    d.signal(libc::SIGTERM);
    let deadline = Instant::now() + NULL_GATEWAY_STOP_TIMEOUT;
    let status = loop {
        if let Some(status) = d.try_wait() {
            break status;
        }
        d.assert_stop_deadline(deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "vipgated exited with {status}:\n{}", d.log_text());
}
