#!/usr/bin/env python3
"""Large UDP exchanges through a VIP, in fragments, for tests/fragments.rs.

Runs in the client's namespace. The rig's backends answer every datagram
with b"NAME " + datagram, so a reply proves the whole datagram arrived,
reassembled, at one backend, and its own fragments came back.

    udp_fragments.py exchanges --vip V --port P --src S --count N --size B --order kernel|reversed
    udp_fragments.py flood --vip V --port P --src S --count N --then M

exchanges: N datagrams of B bytes, each from a UDP socket (a source port)
of its own. "kernel": sent with
send(), so the client's kernel fragments them in order at its MTU.
"reversed": built here (IPv4 and UDP headers, checksums) and sent over a
raw socket, last fragment first. Each reply is awaited (2 s) and checked.

flood: N first fragments (more-fragments set, a 1,472-byte piece, each
its own IP identification) of datagrams never finished, as fast as the
raw socket takes them, then M small unfragmented exchanges.

Prints one JSON line: {"ok": .., "failed": .., "backends": {...}, ...}.
"""

import argparse
import json
import os
import socket
import struct
import sys
import time


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def udp_datagram(src, dst, sport, dport, payload):
    length = 8 + len(payload)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 17, length)
    c = checksum(pseudo + struct.pack("!HHHH", sport, dport, length, 0) + payload) or 0xFFFF
    return struct.pack("!HHHH", sport, dport, length, c) + payload


def ipv4_fragments(src, dst, ident, datagram, piece=1480):
    """The datagram's fragments, in order: pieces of `piece` bytes."""
    out = []
    for off in range(0, len(datagram), piece):
        chunk = datagram[off : off + piece]
        more = off + piece < len(datagram)
        flags = (off // 8) | (0x2000 if more else 0)
        hdr = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(chunk), ident, flags, 64, 17, 0,
            socket.inet_aton(src), socket.inet_aton(dst),
        )
        hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
        out.append(hdr + chunk)
    return out


def await_reply(sock, payload, deadline):
    """The backend's name if its reply to `payload` comes before `deadline`."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            data, _ = sock.recvfrom(65535)
        except socket.timeout:
            return None
        name, _, rest = data.partition(b" ")
        if rest == payload:
            return name.decode()
        # A late reply to an earlier datagram: keep waiting for this one.


def exchanges(args, _, raw):
    ok, failed, backends = 0, 0, {}
    for i in range(args.count):
        # A socket (a source port, a flow) per exchange: the flows spread
        # over the backends.
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((args.src, 0))
        sport = sock.getsockname()[1]
        payload = os.urandom(args.size)
        if args.order == "kernel":
            sock.sendto(payload, (args.vip, args.port))
        else:
            datagram = udp_datagram(args.src, args.vip, sport, args.port, payload)
            ident = (os.getpid() * 7 + i) & 0xFFFF
            for frag in reversed(ipv4_fragments(args.src, args.vip, ident, datagram)):
                raw.sendto(frag, (args.vip, 0))
        name = await_reply(sock, payload, time.monotonic() + 2.0)
        sock.close()
        if name is None:
            failed += 1
        else:
            ok += 1
            backends[name] = backends.get(name, 0) + 1
    return {"ok": ok, "failed": failed, "backends": backends}


def flood(args, sock, raw):
    sport = sock.getsockname()[1]
    start = time.monotonic()
    sent = 0
    for i in range(args.count):
        datagram = udp_datagram(args.src, args.vip, sport, args.port, b"\xab" * 4000)
        first = ipv4_fragments(args.src, args.vip, (i * 13 + 1) & 0xFFFF, datagram, piece=1480)[0]
        try:
            raw.sendto(first, (args.vip, 0))
            sent += 1
        except OSError:
            time.sleep(0.001)
    took = time.monotonic() - start
    ok, failed = 0, 0
    for i in range(args.then):
        payload = b"small %d" % i
        sock.sendto(payload, (args.vip, args.port))
        if await_reply(sock, payload, time.monotonic() + 2.0) is None:
            failed += 1
        else:
            ok += 1
    return {"flood_sent": sent, "flood_seconds": round(took, 3), "ok": ok, "failed": failed}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["exchanges", "flood"])
    ap.add_argument("--vip", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--src", required=True)
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--size", type=int, default=4000)
    ap.add_argument("--order", choices=["kernel", "reversed"], default="kernel")
    ap.add_argument("--then", type=int, default=100)
    args = ap.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((args.src, 0))
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    result = exchanges(args, sock, raw) if args.what == "exchanges" else flood(args, sock, raw)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
