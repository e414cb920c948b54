#!/usr/bin/env python3
"""A Python client of vipgate's gRPC API, generated from proto/vipgate/v1 by
grpcio-tools: proof that the API is usable outside Rust.

    PYTHONPATH=<generated dir> vipgate_client.py --socket /path/api.sock

tests/python_client.rs generates the code (python -m grpc_tools.protoc) into
a temporary directory and runs this script against a fresh vipgated (empty
state directory, one static service "web", two net_null ports). It drives
vipgate.v1.Gateway and vipgate.v1.ServiceManager over the Unix socket and
prints one line per step; on any mismatch it prints "FAIL <step>: <why>" on
stderr and exits 1.
"""

import argparse
import queue
import sys
import threading
import time

try:
    import google.protobuf
    import grpc
    from vipgate.v1 import gateway_pb2, gateway_pb2_grpc, services_pb2, services_pb2_grpc
except ImportError as e:  # pragma: no cover - the test sets PYTHONPATH
    sys.exit(f"FAIL import: {e} (run grpc_tools.protoc on proto/vipgate/v1 and put its output on PYTHONPATH)")

TIMEOUT = 10.0  # seconds, per call

POOL = "py-snat"
SERVICE = "py-api"
B1 = ("198.18.1.21", 8080)
B2 = ("198.18.1.22", 8080)


class Mismatch(Exception):
    pass


def expect(cond, why):
    if not cond:
        raise Mismatch(why)


def ok(step, text):
    print(f"ok {step}: {text}", flush=True)


def failed_call(step, fn, code, *needles):
    """Runs fn(), which must fail with `code` and details naming `needles`."""
    try:
        r = fn()
    except grpc.RpcError as e:
        expect(e.code() == code, f"{step}: expected {code.name}, got {e.code().name}: {e.details()!r}")
        for n in needles:
            expect(n in (e.details() or ""), f"{step}: details {e.details()!r} do not mention {n!r}")
        return e
    raise Mismatch(f"{step}: expected {code.name}, the call succeeded: {r}")


def find_service(state, name):
    for s in state.services:
        if s.name == name:
            return s
    return None


def run(socket):
    target = socket if socket.startswith("unix:") else f"unix:{socket}"
    # gRPC C-core sends the socket path as :authority ("/tmp/.../api.sock"),
    # which the server's HTTP/2 stack (hyper) refuses as an invalid
    # authority (RST_STREAM PROTOCOL_ERROR); name a plain host instead.
    channel = grpc.insecure_channel(target, options=[("grpc.default_authority", "localhost")])
    try:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
    except grpc.FutureTimeoutError:
        raise Mismatch(f"connect: {target} not ready within {TIMEOUT:.0f} s")
    gw = gateway_pb2_grpc.GatewayStub(channel)
    sm = services_pb2_grpc.ServiceManagerStub(channel)
    pb = services_pb2

    # Gateway.GetHealth: SERVING (allow a moment for the dataplane to start).
    deadline = time.monotonic() + TIMEOUT
    while True:
        h = gw.GetHealth(gateway_pb2.GetHealthRequest(), timeout=TIMEOUT)
        if h.status == gateway_pb2.SERVING_STATUS_SERVING or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    status = gateway_pb2.ServingStatus.Name(h.status)
    expect(h.status == gateway_pb2.SERVING_STATUS_SERVING, f"GetHealth: status {status}, expected SERVING")
    expect(h.version != "", "GetHealth: empty version")
    expect(h.ports == 2, f"GetHealth: {h.ports} ports, expected 2")
    expect(h.workers >= 1, f"GetHealth: {h.workers} workers")
    ok("GetHealth", f"{status} version={h.version} workers={h.workers} ports={h.ports} uptime={h.uptime_seconds}s")

    # Gateway.GetCounters: one entry per worker, the pool, both ports.
    c = gw.GetCounters(gateway_pb2.GetCountersRequest(), timeout=TIMEOUT)
    expect(len(c.workers) == h.workers, f"GetCounters: {len(c.workers)} workers, GetHealth said {h.workers}")
    expect([p.name for p in c.ports] == ["a", "b"], f"GetCounters: ports {[p.name for p in c.ports]}")
    expect(c.mempool.size > 0 and c.mempool.in_use <= c.mempool.size, f"GetCounters: mempool {c.mempool}")
    reasons = [d.reason for d in c.total.drops]
    expect("no_service" in reasons, f"GetCounters: drop reasons {reasons} lack no_service")
    expect(
        c.total.rx_packets == sum(w.counters.rx_packets for w in c.workers),
        "GetCounters: total.rx_packets is not the sum of the workers'",
    )
    ok(
        "GetCounters",
        f"{len(c.workers)} workers, ports {[p.name for p in c.ports]}, mempool {c.mempool.name} "
        f"{c.mempool.in_use}/{c.mempool.size} in use, {len(reasons)} drop reasons, rx_packets={c.total.rx_packets}",
    )

    # ServiceManager.GetState: the static service, nothing dynamic yet.
    s = sm.GetState(pb.GetStateRequest(), timeout=TIMEOUT)
    web = find_service(s, "web")
    expect(web is not None and web.origin == pb.ORIGIN_STATIC, f"GetState: no static service 'web': {s}")
    expect(find_service(s, SERVICE) is None, f"GetState: {SERVICE} already exists")
    expect(s.config_file.endswith(".toml"), f"GetState: config_file {s.config_file!r}")
    version = s.version
    ok(
        "GetState",
        f"version={version} services={[x.name for x in s.services]} "
        f"pools={[p.name for p in s.source_pools]} config_file={s.config_file}",
    )

    def mutated(step, r):
        nonlocal version
        expect(r.version == version + 1, f"{step}: version {r.version}, expected {version + 1}")
        version = r.version
        st = sm.GetState(pb.GetStateRequest(), timeout=TIMEOUT)
        expect(st.version == version, f"{step}: GetState's version {st.version}, expected {version}")
        return st

    # CreateSourcePool.
    r = sm.CreateSourcePool(
        pb.CreateSourcePoolRequest(pool=pb.SourcePool(name=POOL, addresses=["198.18.1.101"])), timeout=TIMEOUT
    )
    st = mutated("CreateSourcePool", r)
    pool = next((p for p in st.source_pools if p.name == POOL), None)
    expect(pool is not None and pool.origin == pb.ORIGIN_DYNAMIC, f"CreateSourcePool: not in GetState: {st}")
    expect((pool.first_port, pool.last_port) == (1024, 65535), f"CreateSourcePool: ports {pool}")
    ok("CreateSourcePool", f"{POOL} {list(pool.addresses)} ports {pool.first_port}-{pool.last_port} -> version {version}")

    # CreateService: fullnat, two backends.
    svc = pb.Service(
        name=SERVICE,
        vip="198.18.100.2",
        port=80,
        protocol="tcp",
        mode="fullnat",
        source_pool=POOL,
        backends=[
            pb.Backend(address=B1[0], port=B1[1], weight=1, admin_state=pb.ADMIN_STATE_ENABLED),
            pb.Backend(address=B2[0], port=B2[1], weight=2, admin_state=pb.ADMIN_STATE_ENABLED),
        ],
    )
    st = mutated("CreateService", sm.CreateService(pb.CreateServiceRequest(service=svc), timeout=TIMEOUT))
    got = find_service(st, SERVICE)
    expect(got is not None, f"CreateService: {SERVICE} not in GetState")
    expect(got.origin == pb.ORIGIN_DYNAMIC, f"CreateService: origin {got.origin}")
    expect((got.mode, got.source_pool) == ("fullnat", POOL), f"CreateService: mode {got.mode!r} pool {got.source_pool!r}")
    backends = [(b.address, b.port, b.weight) for b in got.backends]
    expect(backends == [(*B1, 1), (*B2, 2)], f"CreateService: backends {backends}")
    ok("CreateService", f"{SERVICE} fullnat {got.vip}:{got.port}/{got.protocol} backends {backends} -> version {version}")

    # UpdateBackend: drain the second backend.
    r = sm.UpdateBackend(
        pb.UpdateBackendRequest(service=SERVICE, address=B2[0], port=B2[1], admin_state=pb.ADMIN_STATE_DRAINING),
        timeout=TIMEOUT,
    )
    st = mutated("UpdateBackend", r)
    b2 = find_service(st, SERVICE).backends[1]
    expect(b2.admin_state == pb.ADMIN_STATE_DRAINING, f"UpdateBackend: admin_state {b2.admin_state}")
    expect(b2.weight == 2, f"UpdateBackend: weight changed to {b2.weight}")
    ok("UpdateBackend", f"{B2[0]}:{B2[1]} {pb.AdminState.Name(b2.admin_state)} (weight {b2.weight}) -> version {version}")

    # A refused call: weight 70000 is out of range and changes nothing.
    e = failed_call(
        "UpdateBackend weight=70000",
        lambda: sm.UpdateBackend(
            pb.UpdateBackendRequest(service=SERVICE, address=B1[0], port=B1[1], weight=70000), timeout=TIMEOUT
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "weight",
        "70000",
    )
    st = sm.GetState(pb.GetStateRequest(), timeout=TIMEOUT)
    expect(st.version == version, f"refused UpdateBackend changed the version to {st.version}")
    ok("UpdateBackend weight=70000", f"{e.code().name}: {e.details()} (version still {version})")

    # Apply with a stale expected_version: FAILED_PRECONDITION.
    e = failed_call(
        "Apply stale",
        lambda: sm.Apply(pb.ApplyRequest(expected_version=version - 1), timeout=TIMEOUT),
        grpc.StatusCode.FAILED_PRECONDITION,
        "expected_version",
    )
    st = sm.GetState(pb.GetStateRequest(), timeout=TIMEOUT)
    expect(st.version == version and find_service(st, SERVICE) is not None, "refused Apply changed the state")
    ok("Apply expected_version=%d" % (version - 1), f"{e.code().name}: {e.details()}")

    # Watch: the first event is the state; a change made meanwhile arrives
    # next with the next version.
    events = queue.Queue()
    stream = sm.Watch(pb.WatchRequest())

    def reader():
        try:
            for ev in stream:
                events.put(ev)
        except grpc.RpcError as err:
            events.put(err)
        events.put(None)

    t = threading.Thread(target=reader, name="watch", daemon=True)
    t.start()

    def next_event(what):
        try:
            ev = events.get(timeout=TIMEOUT)
        except queue.Empty:
            raise Mismatch(f"Watch: no {what} within {TIMEOUT:.0f} s")
        if isinstance(ev, grpc.RpcError):
            raise Mismatch(f"Watch: stream failed before the {what}: {ev.code().name}: {ev.details()}")
        expect(ev is not None, f"Watch: stream ended before the {what}")
        return ev

    try:
        first = next_event("first event")
        expect(first.WhichOneof("event") == "snapshot", f"Watch: first event is {first.WhichOneof('event')}")
        expect(first.version == version, f"Watch: snapshot version {first.version}, expected {version}")
        expect(find_service(first.snapshot, SERVICE) is not None, f"Watch: snapshot lacks {SERVICE}")
        ok("Watch snapshot", f"version={first.version} services={[x.name for x in first.snapshot.services]}")

        r = sm.UpdateBackend(
            pb.UpdateBackendRequest(service=SERVICE, address=B2[0], port=B2[1], admin_state=pb.ADMIN_STATE_ENABLED),
            timeout=TIMEOUT,
        )
        mutated("UpdateBackend (watched)", r)
        ev = next_event("change event")
        expect(ev.WhichOneof("event") == "change", f"Watch: second event is {ev.WhichOneof('event')}")
        expect(ev.version == version, f"Watch: change version {ev.version}, expected {version}")
        ch = ev.change
        expect(ch.cause == "UpdateBackend", f"Watch: change cause {ch.cause!r}")
        expect(SERVICE in ch.services_changed, f"Watch: services_changed {list(ch.services_changed)}")
        ok("Watch change", f"version={ev.version} cause={ch.cause} services_changed={list(ch.services_changed)}")
    finally:
        stream.cancel()
        t.join(timeout=TIMEOUT)
    expect(not t.is_alive(), "Watch: the reader thread did not end after cancel")

    # DeleteService, then the pool it used.
    st = mutated("DeleteService", sm.DeleteService(pb.DeleteServiceRequest(name=SERVICE), timeout=TIMEOUT))
    expect(find_service(st, SERVICE) is None, f"DeleteService: {SERVICE} still in GetState")
    ok("DeleteService", f"{SERVICE} -> version {version}")
    st = mutated("DeleteSourcePool", sm.DeleteSourcePool(pb.DeleteSourcePoolRequest(name=POOL), timeout=TIMEOUT))
    expect(all(p.name != POOL for p in st.source_pools), f"DeleteSourcePool: {POOL} still in GetState")
    ok("DeleteSourcePool", f"{POOL} -> version {version}")

    channel.close()
    print(f"ok all: final version {version}, grpcio {grpc.__version__}, protobuf {google.protobuf.__version__}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", required=True, help="vipgated's API socket (a path or unix:/path)")
    args = ap.parse_args()
    try:
        run(args.socket)
    except Mismatch as e:
        print(f"FAIL {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except grpc.RpcError as e:
        print(f"FAIL unexpected RPC error: {e.code().name}: {e.details()}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
