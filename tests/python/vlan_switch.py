#!/usr/bin/env python3
"""A userspace 802.1Q switch for tests/vlan.rs: one trunk port, access ports.

    vlan_switch.py --trunk IFACE --access IFACE:VID [--access IFACE:VID ...]
    vlan_switch.py --trunk IFACE --inject VID:COUNT

Frames received on an access port leave on the trunk tagged with its VLAN;
frames received on the trunk with a VLAN an access port has leave on that
port untagged; the rest (untagged, other VLANs) are dropped. What a
switch's access and trunk ports do, with AF_PACKET sockets, for a kernel
without 802.1Q support (no `8021q` module: Linux VLAN interfaces cannot be
made on it). The kernel moves a received frame's tag into the packet's
metadata before any socket sees it, so the trunk's tag is read from
PACKET_AUXDATA.

--inject sends COUNT broadcast ARP requests tagged VID on the trunk, and
exits (traffic of a VLAN the other side may not carry).

Runs until killed; prints one line per port when ready.
"""

import argparse
import select
import socket
import struct
import sys

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_OUTGOING = 4
TP_STATUS_VLAN_VALID = 0x10
AUXDATA = struct.Struct("IIIHHHH")  # status, len, snaplen, mac, net, vlan_tci, vlan_tpid


def open_port(iface):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
    s.bind((iface, 0))
    return s


def tag(frame, vid):
    return frame[:12] + struct.pack("!HH", 0x8100, vid) + frame[12:]


def receive(s):
    """A frame received (not sent) on the socket's port, and its VLAN tag's
    id as the kernel reported it (None: untagged)."""
    frame, anc, _, addr = s.recvmsg(65535, socket.CMSG_SPACE(AUXDATA.size))
    if addr[2] == PACKET_OUTGOING:
        return None, None
    vid = None
    for level, kind, data in anc:
        if level == SOL_PACKET and kind == PACKET_AUXDATA and len(data) >= AUXDATA.size:
            status, _, _, _, _, tci, _ = AUXDATA.unpack(data[: AUXDATA.size])
            if status & TP_STATUS_VLAN_VALID:
                vid = tci & 0x0FFF
    if vid is None and len(frame) >= 18 and frame[12:14] == b"\x81\x00":
        # Still in the frame (no offload): take it out.
        vid = struct.unpack("!H", frame[14:16])[0] & 0x0FFF
        frame = frame[:12] + frame[16:]
    return frame, vid


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    t = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while t >> 16:
        t = (t & 0xFFFF) + (t >> 16)
    return ~t & 0xFFFF


def describe(frame):
    """One line about an untagged frame: MACs, EtherType, and for IPv4 the
    addresses, protocol and ports."""
    if len(frame) < 14:
        return f"{len(frame)} bytes"
    dst, src, etype = frame[0:6].hex(":"), frame[6:12].hex(":"), struct.unpack("!H", frame[12:14])[0]
    text = f"{src} > {dst} {etype:#06x}"
    if etype == 0x0800 and len(frame) >= 34:
        ip = frame[14:]
        hl = (ip[0] & 15) * 4
        text += f" {socket.inet_ntoa(ip[12:16])} > {socket.inet_ntoa(ip[16:20])} proto {ip[9]}"
        if ip[9] in (6, 17) and len(ip) >= hl + 4:
            text += " ports %d > %d" % struct.unpack("!HH", ip[hl : hl + 4])
        total = struct.unpack("!H", ip[2:4])[0]
        text += f" len {total}/{len(ip)} ipsum {'ok' if checksum(ip[:hl]) == 0 else 'BAD'}"
        if ip[9] == 6 and len(ip) >= total:
            pseudo = ip[12:20] + struct.pack("!BBH", 0, 6, total - hl)
            text += f" tcpsum {'ok' if checksum(pseudo + ip[hl:total]) == 0 else 'BAD'}"
    elif etype == 0x0806 and len(frame) >= 42:
        text += f" arp op {frame[21]} {socket.inet_ntoa(frame[28:32])} > {socket.inet_ntoa(frame[38:42])}"
    return text


def inject(trunk, vid, count):
    s = open_port(trunk)
    for i in range(count):
        arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, b"\x02\x00\x00\x00\x76\x2c",
                          bytes([198, 18, 30, 2]), b"\x00" * 6, bytes([198, 18, 30, 1]))
        frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x76\x2c" + b"\x08\x06" + arp
        s.send(tag(frame + b"\x00" * (60 - len(frame)), vid))
    print(f"injected {count} frames tagged VLAN {vid} on {trunk}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trunk", required=True)
    ap.add_argument("--access", action="append", default=[], help="IFACE:VID")
    ap.add_argument("--inject", help="VID:COUNT")
    ap.add_argument("--trace", action="store_true", help="print a line per frame")
    a = ap.parse_args()
    if a.inject:
        vid, count = (int(x) for x in a.inject.split(":"))
        inject(a.trunk, vid, count)
        return 0
    trunk = open_port(a.trunk)
    access = {}
    by_vid = {}
    for spec in a.access:
        iface, vid = spec.rsplit(":", 1)
        s = open_port(iface)
        access[s] = int(vid)
        by_vid[int(vid)] = s
        print(f"access {iface} VLAN {vid}", flush=True)
    print(f"trunk {a.trunk}", flush=True)
    socks = [trunk, *access]
    while True:
        ready, _, _ = select.select(socks, [], [])
        for s in ready:
            frame, vid = receive(s)
            if frame is None:
                continue
            if s is trunk:
                out = by_vid.get(vid)
                if a.trace:
                    print(f"trunk VLAN {vid} -> {'access' if out else 'dropped'}: {describe(frame)}", flush=True)
                if out is not None:
                    out.send(frame)
            elif vid is None:
                if a.trace:
                    print(f"access VLAN {access[s]} -> trunk: {describe(frame)}", flush=True)
                trunk.send(tag(frame, access[s]))


if __name__ == "__main__":
    sys.exit(main())
