#!/usr/bin/env python3
"""Writes the seed corpora of vipgate's fuzz targets.

    tests/fuzz/seeds.py OUT_DIR

OUT_DIR/<target>/ gets one file per seed:
- config: every raw configuration string of controlplane/src/config/tests.rs
  and every ```toml block of docs/configuration.md;
- api: ApplyRequests as the API tests send them (protobuf, encoded here),
  and a few built-from-choices inputs;
- pipeline: the pipeline unit tests' scenarios (a TCP flow through nat,
  fullnat and dsr, UDP, ARP, ICMP echo, the exception path, a martian
  source, a snapshot change, expiry), in the target's operation format;
- flow_table: fills, lookups, expiry and sweeps.
The formats are the targets' own (fuzz_targets/*.rs); a change there
needs a change here.
"""
import hashlib
import re
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def write(out: Path, target: str, data: bytes) -> None:
    d = out / target
    d.mkdir(parents=True, exist_ok=True)
    (d / ("seed-" + hashlib.sha1(data).hexdigest()[:16])).write_bytes(data)


# --- config -----------------------------------------------------------------
def config_seeds(out: Path) -> int:
    n = 0
    text = (ROOT / "controlplane/src/config/tests.rs").read_text()
    for m in re.finditer(r'r#"(.*?)"#', text, re.S):
        s = m.group(1)
        if "[[ports]]" in s or "[eal]" in s:
            write(out, "config", s.encode())
            n += 1
    doc = (ROOT / "docs/configuration.md").read_text()
    for m in re.finditer(r"```toml\n(.*?)```", doc, re.S):
        write(out, "config", m.group(1).encode())
        n += 1
    return n


# --- api: protobuf encoding by hand ------------------------------------------
def varint(v: int) -> bytes:
    b = bytearray()
    while True:
        x = v & 0x7F
        v >>= 7
        if v:
            b.append(x | 0x80)
        else:
            b.append(x)
            return bytes(b)


def field(num: int, value) -> bytes:
    if isinstance(value, int):
        return varint(num << 3) + varint(value)
    if isinstance(value, str):
        value = value.encode()
    return varint(num << 3 | 2) + varint(len(value)) + value


def msg(*fields) -> bytes:
    return b"".join(field(n, v) for n, v in fields if v not in ("", None, 0) or n == 3 and v == 0)


def backend(addr: str, port: int, weight=None) -> bytes:
    f = [(1, addr), (2, port)]
    if weight is not None:
        f.append((3, weight))
    return b"".join(field(n, v) for n, v in f)


def service(name, vip, port, proto, mode="", pool="", tunnel="", backends=(), health=None, removal="") -> bytes:
    b = msg((1, name), (2, vip), (3, port), (4, proto), (5, mode), (6, pool), (7, tunnel), (9, removal))
    for x in backends:
        b += field(10, x)
    if health is not None:
        b += field(12, health)
    return b


def api_seeds(out: Path) -> int:
    web = service(
        "web", "198.18.100.7", 80, "tcp",
        backends=[backend("198.18.1.11", 8080), backend("198.18.1.12", 8080, 3)],
        health=msg((4, "http"), (7, "/health"), (9, "200-299"), (1, 1000), (2, 500), (5, 2), (6, 3)),
    )
    dns = service("dns", "198.18.100.7", 53, "udp", removal="reset", backends=[backend("198.18.1.11", 5353)],
                  health=msg((4, "udp"), (10, "ping"), (11, "pong")))
    fnat = service("fnat", "198.18.100.8", 443, "tcp", mode="fullnat", pool="pool",
                   backends=[backend("198.18.1.21", 8443), backend("198.19.7.7", 8443, 0)])
    dsr = service("dsr", "198.18.100.9", 80, "tcp", mode="dsr", tunnel="198.18.1.64/28",
                  backends=[backend("198.18.1.31", 80)], health=msg((4, "tcp"), (3, 8080)))
    pool = msg((1, "pool"), (2, "198.18.1.100")) + field(2, "198.18.1.101") + msg((3, 10000), (4, 10999))
    requests = [
        field(2, web),
        field(2, web) + field(2, dns),
        field(2, fnat) + field(3, pool),
        field(2, dsr),
        field(2, web) + field(2, dns) + field(2, fnat) + field(2, dsr) + field(3, pool),
        field(1, 3) + field(2, web),
        field(2, service("static-web", "198.18.100.1", 80, "tcp", backends=[backend("198.18.1.11", 8080)])),
    ]
    n = 0
    for r in requests:
        write(out, "api", b"\x00" + r)
        n += 1
    # Built from choices: 3 services and 1 pool, every choice the first.
    for tail in (b"\x03\x01" + b"\x00" * 200, b"\x01\x01\x01" + b"\x02\x02\x02\x01" * 40):
        write(out, "api", tail)
        n += 1
    return n


# --- pipeline ------------------------------------------------------------------
# Indexes into the target's ADDRS and L4_PORTS.
CLIENT, REMOTE, ROUTER, WEB1, FNAT1, DSR1 = 0, 2, 4, 5, 8, 10
VIP1, VIP2, VIP3, PORT0_ADDR, LOOPBACK, POOL0 = 14, 15, 16, 18, 29, 33
P80, P53, P443, P8080, P5353, P8443, P179, P40000 = 0, 1, 2, 3, 4, 5, 6, 9
SYN, ACK, FIN_ACK, RST = 0, 64, 160, 176


def tcp(port, src, dst, sport, dport, flags=SYN, payload=b"\x00", shape=0, mac=4, kind=0):
    return bytes([port, kind, src, dst, sport, dport, flags]) + payload + bytes([shape, mac, 0])


def reply_tcp(port, src, dst, sport, dport, flags=ACK):
    return bytes([port, 3, src, dst, sport, dport, 0, flags, 0, 0, 4, 0])


def udp(port, src, dst, sport, dport):
    return bytes([port, 1, src, dst, sport, dport, 0, 0, 4, 0])


def reply_udp(port, src, dst, sport, dport):
    return bytes([port, 4, src, dst, sport, dport, 1, 0, 0, 4, 0])


def echo(port, src, dst):
    return bytes([port, 5, src, dst, 0, 0, 0, 4, 0])


def arp_request(port, sender, target):
    return bytes([port, 6, sender, target, 0, 0])


def burst(*frames, worker=0):
    return bytes([0, worker, len(frames) - 1]) + b"".join(frames)


def advance_s(seconds):
    return bytes([4, 1, seconds])


def housekeeping(passes=255):
    return bytes([5, passes])


def snapshot(i):
    return bytes([6, i])


def pipeline_seeds(out: Path) -> int:
    teach = b"\x00"
    fnat_reply = bytes([1, 3, FNAT1, POOL0, P8443, 254, 0x00, 0x05, 0, ACK, 0, 0, 4, 0])
    big_dsr = tcp(0, CLIENT, VIP3, P40000, P80, payload=bytes([250, 100]), shape=0x10)
    raw = bytes([0, 10]) + struct.pack(">H", 60) + bytes(range(60)) + b"\x00"
    seeds = [
        # A TCP flow through nat: SYN, data, the backend's reply, FIN, expiry.
        teach
        + burst(tcp(0, CLIENT, VIP1, P40000, P80))
        + burst(tcp(0, CLIENT, VIP1, P40000, P80, flags=ACK, payload=bytes([200, 18])))
        + burst(reply_tcp(1, WEB1, CLIENT, P8080, P40000), worker=1)
        + burst(reply_tcp(1, WEB1, CLIENT, P8080, P40000, flags=FIN_ACK), worker=1)
        + advance_s(200)
        + housekeeping(),
        # UDP both ways.
        teach + burst(udp(0, CLIENT, VIP1, P40000, P53), reply_udp(1, WEB1, CLIENT, P5353, P40000)),
        # FullNAT out and back; DSR, and a DSR packet too big for the MTU.
        teach + burst(tcp(0, CLIENT, VIP2, P40000, P443), tcp(0, REMOTE, VIP2, P40000, P443)) + burst(fnat_reply),
        teach + burst(tcp(0, CLIENT, VIP3, P40000, P80), udp(0, CLIENT, VIP3, P40000, P53), big_dsr),
        # Unresolved neighbours: solicitations, then housekeeping asks again.
        b"\x01" + burst(tcp(0, CLIENT, VIP1, P40000, P80)) + advance_s(5) + housekeeping(3),
        # ARP for a VIP and a port, echo to both, BGP and IPv6 to the kernel.
        teach
        + burst(
            arp_request(0, CLIENT, VIP1),
            arp_request(0, CLIENT, PORT0_ADDR),
            echo(0, CLIENT, PORT0_ADDR),
            echo(0, CLIENT, VIP1),
            tcp(0, ROUTER, PORT0_ADDR, P40000, P179),
            bytes([0, 8, 4, 0]),
        ),
        # A martian source to a VIP; a frame for another host.
        teach + burst(tcp(0, LOOPBACK, VIP1, P40000, P80), echo(0, VIP1, VIP1), tcp(0, CLIENT, VIP1, P40000, P80, mac=2)),
        # Backends leave: rehash and reset on the next packets.
        teach
        + burst(tcp(0, CLIENT, VIP1, P40000, P80, flags=ACK), udp(0, CLIENT, VIP1, P40000, P53))
        + snapshot(1)
        + burst(tcp(0, CLIENT, VIP1, P40000, P80, flags=ACK), udp(0, CLIENT, VIP1, P40000, P53))
        + snapshot(2)
        + burst(tcp(0, CLIENT, VIP1, P40000, P80, flags=ACK), tcp(0, CLIENT, VIP2, P40000, P443)),
        # The other worker, and raw bytes.
        teach + burst(tcp(0, CLIENT, VIP1, P40000, P80), tcp(0, REMOTE, VIP1, P8080, P80), worker=1) + burst(raw),
    ]
    for s in seeds:
        write(out, "pipeline", s)
    return len(seeds)


# --- flow table ------------------------------------------------------------------
def flow_seeds(out: Path) -> int:
    # Timeouts (5 x 2 bytes), capacity choice, seed, start time.
    head = bytes([3, 0, 40, 0, 10, 0, 2, 0, 20, 0]) + bytes([1]) + b"\x00\x00\x00\x07" + b"\x00\x10\x00\x00"
    fill = b"".join(bytes([0, k, 0]) for k in range(40))
    lookups = b"".join(bytes([3, k]) for k in range(0, 40, 3))
    flags = b"".join(bytes([6, k, 0, 0x10, 1]) + bytes([6, k, 1, 0x01, 1]) for k in range(0, 40, 5))
    seeds = [
        head + fill + lookups + bytes([7, 0x40, 0]) + bytes([8, 255]) + fill,
        head + fill + flags + bytes([7, 0x20, 0]) + lookups + bytes([5, 1, 5, 2]) + bytes([9, 1]) + bytes([8, 16]),
        bytes([63] * 10) + bytes([0]) + b"\x00\x00\x00\x01\x00\x00\x00\x00" + fill + fill + bytes([7, 0xff, 0xff, 8, 255]),
    ]
    for s in seeds:
        write(out, "flow_table", s)
    return len(seeds)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: seeds.py OUT_DIR")
    out = Path(sys.argv[1])
    counts = {
        "config": config_seeds(out),
        "api": api_seeds(out),
        "pipeline": pipeline_seeds(out),
        "flow_table": flow_seeds(out),
    }
    print("seeds: " + ", ".join(f"{t} {n}" for t, n in counts.items()))


if __name__ == "__main__":
    main()
