#!/usr/bin/env python3
"""Writes pcap files of synthetic client->VIP traffic for vipgate's dataplane benchmark.

    scripts/gen-pcap.py --flows 10000 --size 64 --new-share 0.0 --proto tcp \\
        --ipv 4 --seed 1 --out bench-results/pcap/tcp-64-10k-new0.pcap

Deterministic: the same arguments (seed included) always give the same bytes,
on any machine and any Python 3 version (it uses its own PRNG, splitmix64,
never the `random` module).

What the capture holds
  * --flows N distinct 5-tuples (clients -> VIP:port). Packet k belongs to flow
    k mod N, so a replay cycles through every flow in turn, and two packets in
    a row belong to different flows whenever N > 1.
  * max(N, --min-packets) packets (rounded up to a multiple of 12 for IMIX),
    so one pass over a large flow set shows every flow once, and a small flow
    set still fills a realistic number of packet buffers.
  * --new-share S: that share of the packets open a connection (TCP SYN with
    an MSS option); the others are established traffic (PSH+ACK with data).
    The SYNs are spread evenly over the capture. When N >= the packet count,
    every flow appears once per pass and S is exactly the share of the flows
    that are new. UDP has no connection opening, so it only accepts S = 0.
  * Frame sizes are sizes on the wire including the 4-byte FCS, as in RFC 2544
    and IMIX definitions; the pcap stores frames without FCS, so "64" writes
    60-byte frames. "imix" is Simple IMIX, 7:4:1 of 64/570/1518 bytes, in a
    seeded order within each block of 12 packets. Every frame is exactly its
    size: the L4 payload fills it, no Ethernet padding (SYNs carry data as
    with TCP Fast Open, so the size mix is the same for every share). Frames
    too small for the headers (IPv6 + TCP in 64 bytes) grow to the smallest
    size that holds them (82 bytes for IPv6 + TCP), as RFC 5180 does.
  * IPv4 and L4 checksums are correct; TTL 64; DF set for TCP.
  * Addresses come from the test networks only. IPv4: clients 198.18.0.2 to
    198.18.0.254 with source ports 1024-65535 (16.3 M distinct tuples), VIP
    198.18.100.1. IPv6: clients 2001:db8:0:1::2 to ::fe, VIP 2001:db8:0:100::1.
    Destination port 80 for TCP, 53 for UDP, unless --dport says otherwise.
  * Every frame is addressed to the receiving port's MAC (--dst-mac; by
    default 02:70:63:61:70:00, the MAC DPDK's net_pcap gives the first
    device of a process): vipgate drops unicast frames for other MACs.

--flood-share S with --flood-flows M mixes a SYN flood into established
traffic: that share of the packets (spread evenly, as SYNs are above) are
SYNs from M distinct spoofed sources (198.19.0.0/16, source ports
1024-65535, so never a tuple of the established flows), each tuple once
per M flood packets, to --flood-dport (default: --dport); the other packets
are PSH+ACK segments of the --flows N established flows, flow i at every
N-th of them. The capture then holds max(ceil(M / S), ceil(N / (1 - S)),
--min-packets) packets, so every flood tuple and every established flow
appear at least once per pass. Needs TCP over IPv4 and --new-share 0.

--fragments F (UDP over IPv4, one fixed size) makes every datagram F
IPv4 fragments, each frame the given size: the datagram carries F times
the largest multiple of 8 bytes a frame holds after its IPv4 header
(24 at 64 bytes), the first fragment its UDP header, the others only
payload; in order, more-fragments set on all but the last, IP
identification the datagram's number. Flow f sends datagrams f, f + N, ...,
so the capture holds max(N, --min-packets) datagrams (times F frames),
and the UDP checksum is the whole datagram's. Frames shorter than the size
(the header room left over) carry Ethernet padding.

--vlan ID tags every frame 802.1Q with VLAN ID (the tag is inside the
frame size: a 64-byte tagged frame carries 4 bytes less payload).

--shards K splits the capture by flow (flow i goes to shard i mod K) into K
files, OUT without .pcap plus .s0ofK.pcap to .s<K-1>ofK.pcap, so K queues
each replay their own share of the flows. A JSON summary of what was written
is printed on stdout.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import struct
import sys

MASK64 = (1 << 64) - 1

# The Ethernet addresses. The destination is the receiving port's MAC: the
# gateway drops unicast frames for any other MAC (`other_host`). By default
# the MAC DPDK's net_pcap gives the first device a process creates,
# 02:70:63:61:70:00 ("pcap", then the device index), which is the port the
# benchmark replays into; --dst-mac sets another. The source is the
# upstream router every client packet comes through (locally administered
# unicast).
NET_PCAP_FIRST_MAC = "02:70:63:61:70:00"
SRC_MAC = bytes.fromhex("0276670000fe")

IMIX = (64,) * 7 + (570,) * 4 + (1518,)
FCS = 4
MIN_FRAME = 64
MAX_FRAME = 1518

CLIENT_V4_BASE = int(ipaddress.IPv4Address("198.18.0.0"))
CLIENT_V6_BASE = int(ipaddress.IPv6Address("2001:db8:0:1::"))
CLIENT_HOSTS = 253  # .2 to .254 (and ::2 to ::fe)
CLIENT_FIRST_HOST = 2
PORT_FIRST = 1024
PORT_COUNT = 65536 - PORT_FIRST
TUPLE_SPACE = CLIENT_HOSTS * PORT_COUNT

TCP_SYN, TCP_PSH, TCP_ACK = 0x02, 0x08, 0x10

# Spoofed SYN sources (--flood-share): 198.19.0.0/16, the upper half of the
# benchmark network, where no established client lives.
FLOOD_V4_BASE = int(ipaddress.IPv4Address("198.19.0.0"))
FLOOD_HOSTS = 65536
FLOOD_SPACE = FLOOD_HOSTS * PORT_COUNT


class SplitMix64:
    """A small, fully specified PRNG, so captures never depend on Python's."""

    def __init__(self, seed: int) -> None:
        self.state = seed & MASK64

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return self.next() % n

    def shuffle(self, items: list) -> None:
        for i in range(len(items) - 1, 0, -1):
            j = self.below(i + 1)
            items[i], items[j] = items[j], items[i]


def fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def word_sum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    return sum(struct.unpack(f"!{len(b) // 2}H", b))


def parse_size(s: str) -> str | int:
    if s == "imix":
        return s
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a frame size in bytes or 'imix'")
    if not MIN_FRAME <= n <= MAX_FRAME:
        raise argparse.ArgumentTypeError(f"frame size {n} is outside {MIN_FRAME}..{MAX_FRAME} (sizes include the FCS)")
    return n


def parse_share(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number from 0 to 1")
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{s} is not from 0 to 1")
    return v


def parse_mac(s: str) -> bytes:
    parts = s.split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts):
        raise argparse.ArgumentTypeError(f"{s!r} is not a MAC address (six hex pairs separated by ':')")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1:
        raise argparse.ArgumentTypeError(f"{s} is a group address; the destination must be the port's unicast MAC")
    return mac


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--flows", type=int, required=True, help="distinct 5-tuples (1 to 16321536)")
    ap.add_argument("--size", type=parse_size, default=64, help="frame size with FCS (64..1518) or 'imix' (default 64)")
    ap.add_argument("--new-share", type=parse_share, default=0.0, help="share of packets that open a connection, 0..1 (default 0)")
    ap.add_argument("--proto", choices=("tcp", "udp"), default="tcp")
    ap.add_argument("--ipv", type=int, choices=(4, 6), default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--min-packets", type=int, default=4096, help="packets in the capture at least (default 4096)")
    ap.add_argument("--vip", help="VIP (default 198.18.100.1 or 2001:db8:0:100::1)")
    ap.add_argument("--dport", type=int, help="VIP port (default 80 for tcp, 53 for udp)")
    ap.add_argument("--shards", type=int, default=1, help="split by flow into this many files (default 1)")
    ap.add_argument("--dst-mac", type=parse_mac, default=parse_mac(NET_PCAP_FIRST_MAC),
                    help=f"destination MAC: the receiving port's (default {NET_PCAP_FIRST_MAC}, net_pcap's first device)")
    ap.add_argument("--flood-share", type=parse_share, default=0.0,
                    help="share of packets that are spoofed SYNs, 0..1 exclusive of 1 (default 0: no flood)")
    ap.add_argument("--flood-flows", type=int, default=0, help="distinct spoofed SYN tuples (with --flood-share)")
    ap.add_argument("--flood-dport", type=int, help="port the spoofed SYNs go to (default: --dport)")
    ap.add_argument("--fragments", type=int, default=1, help="IPv4 fragments per UDP datagram (default 1: none)")
    ap.add_argument("--vlan", type=int, default=0, help="tag every frame 802.1Q with this VLAN id (default 0: untagged)")
    ap.add_argument("--out", required=True, help="output file (.pcap)")
    a = ap.parse_args(argv)

    if not 1 <= a.flows <= TUPLE_SPACE:
        ap.error(f"--flows must be from 1 to {TUPLE_SPACE}")
    if a.proto == "udp" and a.new_share != 0.0:
        ap.error("--new-share applies to TCP only (UDP has no connection opening); use 0 with --proto udp")
    if a.min_packets < 1:
        ap.error("--min-packets must be at least 1")
    if not 1 <= a.shards <= 64 or a.shards > a.flows:
        ap.error("--shards must be from 1 to 64 and at most --flows")
    if not 0 <= a.vlan <= 4094:
        ap.error("--vlan must be from 1 to 4094 (0: untagged)")
    if a.vlan and a.ipv != 4:
        ap.error("--vlan needs --ipv 4")
    if not 1 <= a.fragments <= 64:
        ap.error("--fragments must be from 1 to 64")
    if a.fragments > 1 and (a.proto != "udp" or a.ipv != 4 or a.size == "imix" or a.flood_share):
        ap.error("--fragments needs --proto udp, --ipv 4, a fixed --size and no --flood-share")
    dport = a.dport if a.dport is not None else (80 if a.proto == "tcp" else 53)
    if not 1 <= dport <= 65535:
        ap.error("--dport must be from 1 to 65535")
    flood = a.flood_share > 0
    flood_dport = a.flood_dport if a.flood_dport is not None else dport
    if flood or a.flood_flows or a.flood_dport is not None:
        if not 0.0 < a.flood_share < 1.0:
            ap.error("--flood-share must be above 0 and below 1 (some packets must be established traffic)")
        if not 1 <= a.flood_flows <= FLOOD_SPACE:
            ap.error(f"--flood-flows must be from 1 to {FLOOD_SPACE} with --flood-share")
        if a.proto != "tcp" or a.ipv != 4:
            ap.error("--flood-share needs --proto tcp and --ipv 4 (the flood is of TCP SYNs from 198.19.0.0/16)")
        if a.new_share != 0.0:
            ap.error("--flood-share needs --new-share 0 (the established flows send PSH+ACK only)")
        if not 1 <= flood_dport <= 65535:
            ap.error("--flood-dport must be from 1 to 65535")
    vip = ipaddress.ip_address(a.vip) if a.vip else ipaddress.ip_address("198.18.100.1" if a.ipv == 4 else "2001:db8:0:100::1")
    if vip.version != a.ipv:
        ap.error(f"--vip {vip} is not an IPv{a.ipv} address")
    test_nets = [ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("2001:db8::/32")]
    if not any(vip in n for n in test_nets if n.version == vip.version):
        ap.error(f"--vip {vip} is outside the test networks 198.18.0.0/15 and 2001:db8::/32")

    rng = SplitMix64(a.seed)

    # Packets: at least one per flow, at least --min-packets, whole IMIX blocks.
    packets = max(a.flows, a.min_packets)
    if flood:
        packets = max(packets, math.ceil(a.flood_flows / a.flood_share - 1e-9),
                      math.ceil(a.flows / (1.0 - a.flood_share) - 1e-9))
    if a.size == "imix":
        packets = math.ceil(packets / len(IMIX)) * len(IMIX)

    # Flow f gets tuple index j = (mult * f + add) mod TUPLE_SPACE: a seeded
    # bijection, so tuples are distinct and neighbours differ in address and
    # port.
    while True:
        mult = rng.below(TUPLE_SPACE - 2) + 2
        if math.gcd(mult, TUPLE_SPACE) == 1:
            break
    add = rng.below(TUPLE_SPACE)
    # The same for the flood's tuples, drawn after everything else so that
    # a capture without a flood keeps its bytes.
    flood_mult = flood_add = 0

    # Per-flow TCP sequence numbers (initial) from the seed.
    isn = [rng.next() & 0xFFFFFFFF for _ in range(a.flows)] if a.proto == "tcp" else None
    # Frame sizes without FCS, per packet.
    if a.size == "imix":
        sizes = []
        block = list(IMIX)
        for _ in range(packets // len(IMIX)):
            rng.shuffle(block)
            sizes.extend(s - FCS for s in block)
    else:
        sizes = None
        fixed = a.size - FCS
    payload_pattern = bytes(rng.next() & 0xFF for _ in range(MAX_FRAME))
    if flood:
        while True:
            flood_mult = rng.below(FLOOD_SPACE - 2) + 2
            if math.gcd(flood_mult, FLOOD_SPACE) == 1:
                break
        flood_add = rng.below(FLOOD_SPACE)

    eth_type = 0x0800 if a.ipv == 4 else 0x86DD
    eth = a.dst_mac + SRC_MAC + (struct.pack("!HH", 0x8100, a.vlan) if a.vlan else b"") + struct.pack("!H", eth_type)
    ip_hlen = 20 if a.ipv == 4 else 40
    l4_proto = 6 if a.proto == "tcp" else 17
    vip_bytes = vip.packed
    vip_sum = word_sum(vip_bytes)
    client_base = CLIENT_V4_BASE if a.ipv == 4 else CLIENT_V6_BASE
    addr_len = 4 if a.ipv == 4 else 16

    # Checksum sums of payload prefixes, by length (only a few lengths occur).
    payload_sums: dict[int, int] = {}

    def payload(n: int) -> tuple[bytes, int]:
        p = payload_pattern[:n]
        if n not in payload_sums:
            payload_sums[n] = word_sum(p)
        return p, payload_sums[n]

    # Frames too small for the headers (IPv6 + TCP does not fit 64 bytes)
    # grow to the smallest frame that holds them, as RFC 5180 does for IPv6.
    header_room = len(eth) + ip_hlen + (24 if a.proto == "tcp" else 8)  # a SYN has the MSS option
    grown = 0
    if sizes:
        grown = sum(1 for s in sizes if s < header_room)
        sizes = [max(s, header_room) for s in sizes]
    elif fixed < header_room:
        grown = packets
        fixed = header_room

    shard_names = [a.out] if a.shards == 1 else [shard_name(a.out, i, a.shards) for i in range(a.shards)]
    outs = [open(n, "wb") for n in shard_names]
    bufs = [bytearray() for _ in outs]
    pcap_header = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    for b in bufs:
        b += pcap_header

    syn_count = 0
    written = [0] * len(outs)
    total_bytes = 0
    seq_pos = [0] * a.flows if a.proto == "tcp" else None
    share = a.new_share
    base_ts = 1_700_000_000
    flood_count = established = 0
    def emit(frame: bytes, flow: int) -> int:
        """Appends `frame` to flow `flow`'s shard; returns its length."""
        shard = flow % a.shards
        n = written[shard]
        b = bufs[shard]
        b += struct.pack("<IIII", base_ts + n // 1_000_000, n % 1_000_000, len(frame), len(frame))
        b += frame
        written[shard] = n + 1
        if len(b) >= 1 << 22:
            outs[shard].write(b)
            b.clear()
        return len(frame)

    if a.fragments > 1:
        packets *= a.fragments
    piece = ((fixed - len(eth) - 20) // 8) * 8 if a.fragments > 1 else 0
    datagram = b""
    for k in range(packets):
        frame_len = sizes[k] if sizes else fixed
        if a.fragments > 1:
            d, part = divmod(k, a.fragments)
            f = d % a.flows
            if part == 0:
                j = (mult * f + add) % TUPLE_SPACE
                src = (client_base + CLIENT_FIRST_HOST + j % CLIENT_HOSTS).to_bytes(4, "big")
                sport = PORT_FIRST + j // CLIENT_HOSTS
                udp_len = piece * a.fragments
                data, dsum = payload(udp_len - 8)
                sm = word_sum(src) + vip_sum + l4_proto + udp_len + word_sum(struct.pack("!HHHH", sport, dport, udp_len, 0)) + dsum
                c = (~fold(sm)) & 0xFFFF or 0xFFFF
                datagram = struct.pack("!HHHH", sport, dport, udp_len, c) + data
                established += 1
            chunk = datagram[part * piece:(part + 1) * piece]
            flags = (part * piece // 8) | (0x2000 if part + 1 < a.fragments else 0)
            hdr = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(chunk), d & 0xFFFF, flags, 64, l4_proto, 0) + src + vip_bytes
            hc = (~fold(word_sum(hdr))) & 0xFFFF
            frame = eth + hdr[:10] + struct.pack("!H", hc) + hdr[12:] + chunk
            frame += bytes(frame_len - len(frame))
        else:
            frame = None
        if frame is not None:
            total_bytes += emit(frame, f)
            continue
        l4_len = frame_len - len(eth) - ip_hlen
        # Evenly spread: packet k is a flood SYN when floor((k+1)s) > floor(ks).
        spoofed = flood and math.floor((k + 1) * a.flood_share + 1e-9) > math.floor(k * a.flood_share + 1e-9)
        if spoofed:
            fi = flood_count % a.flood_flows
            flood_count += 1
            j = (flood_mult * fi + flood_add) % FLOOD_SPACE
            src = (FLOOD_V4_BASE + j % FLOOD_HOSTS).to_bytes(4, "big")
            sport = PORT_FIRST + j // FLOOD_HOSTS
            f = fi  # for the shard
            syn = True
            l4_dport = flood_dport
        else:
            f = established % a.flows
            established += 1
            j = (mult * f + add) % TUPLE_SPACE
            host = CLIENT_FIRST_HOST + j % CLIENT_HOSTS
            sport = PORT_FIRST + j // CLIENT_HOSTS
            src = (client_base + host).to_bytes(addr_len, "big")
            # Evenly spread SYNs: packet k is a SYN when floor((k+1)s) > floor(ks).
            syn = share > 0 and math.floor((k + 1) * share + 1e-9) > math.floor(k * share + 1e-9)
            l4_dport = dport

        if a.proto == "tcp":
            if syn:
                syn_count += 1
                hdr_len = 24
                flags = TCP_SYN
                seq = ((fi * 0x9E3779B1) ^ 0x5EED) & 0xFFFFFFFF if spoofed else isn[f]
                ack = 0
                opts = struct.pack("!BBH", 2, 4, 1460)
            else:
                hdr_len = 20
                flags = TCP_PSH | TCP_ACK
                seq = (isn[f] + 1 + seq_pos[f]) & 0xFFFFFFFF
                ack = (isn[f] ^ 0x5A5A5A5A) & 0xFFFFFFFF
                opts = b""
            data, dsum = payload(l4_len - hdr_len)
            if not syn:
                seq_pos[f] += len(data)
            l4 = struct.pack("!HHIIBBHHH", sport, l4_dport, seq, ack, (hdr_len // 4) << 4, flags, 64240, 0, 0) + opts
        else:
            data, dsum = payload(l4_len - 8)
            l4 = struct.pack("!HHHH", sport, dport, l4_len, 0)
        # L4 checksum: pseudo-header (addresses, protocol, length) + header + data.
        s = word_sum(src) + vip_sum + l4_proto + l4_len + word_sum(l4) + dsum
        c = (~fold(s)) & 0xFFFF
        if c == 0 and a.proto == "udp":
            c = 0xFFFF
        csum_at = 16 if a.proto == "tcp" else 6
        l4 = l4[:csum_at] + struct.pack("!H", c) + l4[csum_at + 2:]

        if a.ipv == 4:
            ident = k & 0xFFFF
            frag = 0x4000 if a.proto == "tcp" else 0
            hdr = struct.pack("!BBHHHBBH", 0x45, 0, 20 + l4_len, ident, frag, 64, l4_proto, 0) + src + vip_bytes
            hc = (~fold(word_sum(hdr))) & 0xFFFF
            ip = hdr[:10] + struct.pack("!H", hc) + hdr[12:]
        else:
            ip = struct.pack("!IHBB", 6 << 28, l4_len, l4_proto, 64) + src + vip_bytes

        frame = eth + ip + l4 + data
        assert len(frame) == frame_len, (len(frame), frame_len)
        total_bytes += emit(frame, f)
    for o, b in zip(outs, bufs):
        o.write(b)
        o.close()

    summary = {
        "files": shard_names,
        "packets": packets,
        "packets_per_file": written,
        "flows": a.flows,
        "size": a.size,
        "new_share": a.new_share,
        "syn_packets": syn_count,
        "flood_share": a.flood_share,
        "flood_packets": flood_count,
        "flood_tuples": min(flood_count, a.flood_flows),
        "flood_dport": flood_dport if flood else None,
        "established_packets": established,
        "proto": a.proto,
        "ipv": a.ipv,
        "seed": a.seed,
        "fragments": a.fragments,
        "vlan": a.vlan,
        "dst_mac": ":".join(f"{b:02x}" for b in a.dst_mac),
        "vip": str(vip),
        "dport": dport,
        "frame_bytes_without_fcs": total_bytes,
        "mean_frame_bytes_with_fcs": round(total_bytes / packets + FCS, 2),
        "largest_frame_without_fcs": max(sizes) if sizes else fixed,
        "frames_grown_to_fit_headers": grown,
    }
    json.dump(summary, sys.stdout)
    sys.stdout.write("\n")
    return 0


def shard_name(out: str, i: int, k: int) -> str:
    stem = out[:-5] if out.endswith(".pcap") else out
    return f"{stem}.s{i}of{k}.pcap"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
