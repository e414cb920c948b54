#!/usr/bin/env python3
"""A test backend for vipgate's rig: HTTP and UDP on one or more addresses.

    backend.py --name NAME --bind ADDR [--bind ADDR ...]
               [--http-port 8080] [--udp-port 5353]
               [--pid-file FILE] [--access-log FILE] [--ipip-decap TUNDEV]

Each --bind address gets its own HTTP listener and UDP socket (a DSR
backend binds its own address and the VIP it holds on lo: a UDP reply then
leaves from the address the request came to, the VIP, as the client expects).

HTTP (HTTP/1.1, keep-alive, one thread per connection):
  GET  /            200 "backend NAME\\n", header X-Backend: NAME
  GET  /whoami      200 "backend NAME\\nclient IP:PORT\\nlocal IP:PORT\\n"
                    (the client address as the backend sees it: in NAT mode
                    it is the real client's)
  GET  /bytes?n=N   200, N bytes of the deterministic pattern below, streamed
                    (&rate=R: at most R bytes per second, R a whole number
                    with an optional K, M or G suffix, powers of 1024, as
                    curl's --limit-rate takes it; a client's own limit only
                    slows its reading, which socket buffers hide for
                    megabytes)
  POST /sha256      200 "<sha256 hex of the request body> <length>\\n"
  GET  /health      200 "ok\\n"
Every response carries X-Backend: NAME and X-Client: IP:PORT.

The /bytes pattern: byte i of the body is (i % 251). 251 is prime, so the
pattern does not line up with packet or buffer sizes. A client checks a
transfer by comparing the sha256 of what it got with the sha256 of
bytes(i % 251 for i in range(N)).

UDP: every datagram is answered with b"NAME " + datagram, to its sender,
from the socket (and so the address) it arrived on.

--ipip-decap TUNDEV: a user-space stand-in for the kernel's IPIP receive
path (tunl0), for kernels built without CONFIG_NET_IPIP. A raw socket takes
every IPIP packet addressed to this namespace (the kernel has already checked
the outer header), strips the outer header and writes the inner packet to
the existing TUN device TUNDEV (created by rig.sh with `ip tuntap add mode
tun`), where the kernel receives it as it would on tunl0. Needs root.

SIGTERM or SIGINT: stop every server, remove the pid file, exit 0.
Python 3 standard library only. No per-request logging unless --access-log.
"""

import argparse
import fcntl
import hashlib
import http.server
import ipaddress
import os
import signal
import socket
import struct
import sys
import threading
import time
import urllib.parse

PATTERN_MODULUS = 251
# One chunk is a whole number of pattern periods, so every chunk is the same.
CHUNK = bytes(i % PATTERN_MODULUS for i in range(PATTERN_MODULUS * 256))
MAX_BYTES = 1 << 40


def family_of(address):
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def fmt_addr(addr):
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def version_string(self):
        return "vipgate-backend/1"

    def log_message(self, format, *args):  # noqa: A002 (the stdlib's name)
        log = self.server.access_log
        if log is not None:
            with self.server.log_lock:
                log.write("%s %s\n" % (fmt_addr(self.client_address), format % args))
                log.flush()

    def _head(self, status, length, content_type="text/plain; charset=utf-8"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header("X-Backend", self.server.backend_name)
        self.send_header("X-Client", fmt_addr(self.client_address))
        self.end_headers()

    def _text(self, status, text):
        body = text.encode()
        self._head(status, len(body))
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        name = self.server.backend_name
        if url.path == "/":
            self._text(200, f"backend {name}\n")
        elif url.path == "/health":
            self._text(200, "ok\n")
        elif url.path == "/whoami":
            local = self.connection.getsockname()
            self._text(
                200,
                f"backend {name}\nclient {fmt_addr(self.client_address)}\nlocal {fmt_addr(local)}\n",
            )
        elif url.path == "/bytes":
            self._bytes(urllib.parse.parse_qs(url.query))
        else:
            self._text(404, "not found\n")

    do_HEAD = do_GET

    def _bytes(self, query):
        try:
            n = int(query.get("n", ["0"])[0])
            if not 0 <= n <= MAX_BYTES:
                raise ValueError
        except ValueError:
            self._text(400, f"n must be an integer in 0..{MAX_BYTES}\n")
            return
        rate = query.get("rate", [""])[0]
        if rate:
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(rate[-1:].upper(), 1)
            digits = rate[:-1] if scale > 1 else rate
            if not digits.isdigit() or int(digits) == 0:
                self._text(400, "rate must be a positive whole number of bytes per second, with an optional K, M or G\n")
                return
            rate = int(digits) * scale
        self._head(200, n, "application/octet-stream")
        if self.command == "HEAD":
            return
        view = memoryview(CHUNK)
        # Paced in pieces of a tenth of a second (at most a chunk).
        piece = len(CHUNK) if not rate else max(1, min(len(CHUNK), rate // 10))
        start = time.monotonic()
        sent = 0
        while sent < n:
            take = min(n - sent, piece)
            self.wfile.write(view[:take])
            sent += take
            if rate:
                ahead = sent / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)

    def do_POST(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/sha256":
            self._text(404, "not found\n")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._text(411, "Content-Length required\n")
            return
        digest = hashlib.sha256()
        left = length
        while left > 0:
            data = self.rfile.read(min(left, 1 << 16))
            if not data:
                break
            digest.update(data)
            left -= len(data)
        if left:
            self.close_connection = True
            return
        self._text(200, f"{digest.hexdigest()} {length}\n")


class HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, name, access_log):
        self.address_family = family_of(address[0])
        self.backend_name = name
        self.access_log = access_log
        self.log_lock = threading.Lock()
        super().__init__(address, Handler)

    def handle_error(self, request, client_address):
        # A client that goes away mid-response is not worth a traceback.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IPPROTO_IPIP = 4


def open_decap(tun_dev):
    """The raw IPIP socket and the TUN device's fd, or an error message."""
    # TUNSETIFF would create a missing device rather than fail.
    if not os.path.exists(f"/sys/class/net/{tun_dev}"):
        return None, None, f"no device {tun_dev!r} here (create it with: ip tuntap add dev {tun_dev} mode tun)"
    try:
        tun = os.open("/dev/net/tun", os.O_RDWR)
    except OSError as e:
        return None, None, f"cannot open /dev/net/tun: {e}"
    try:
        fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH", tun_dev.encode(), IFF_TUN | IFF_NO_PI))
    except OSError as e:
        os.close(tun)
        return None, None, f"cannot attach to TUN device {tun_dev!r} (create it with: ip tuntap add dev {tun_dev} mode tun): {e}"
    try:
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_IPIP)
    except OSError as e:
        os.close(tun)
        return None, None, f"cannot open a raw IPIP socket: {e}"
    # Room for a burst of tunnelled ACKs while this thread is not scheduled.
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    raw.settimeout(0.5)
    return raw, tun, None


def serve_decap(raw, tun, name, stop):
    """Outer IPv4 header off, inner IPv4 packet into the TUN device."""
    bad = 0
    while not stop.is_set():
        try:
            packet = raw.recv(65535)
        except socket.timeout:
            continue
        except OSError:
            if stop.is_set():
                return
            raise
        ok = len(packet) >= 40 and packet[0] >> 4 == 4
        if ok:
            ihl = (packet[0] & 0x0F) * 4
            outer_len = int.from_bytes(packet[2:4], "big")
            inner = packet[ihl:outer_len]
            ok = ihl >= 20 and outer_len <= len(packet) and len(inner) >= 20 and inner[0] >> 4 == 4
        if not ok:
            bad += 1
            if bad <= 10:
                print(f"backend {name}: dropping a malformed IPIP packet ({len(packet)} bytes)", file=sys.stderr)
            continue
        try:
            os.write(tun, inner)
        except OSError as e:
            print(f"backend {name}: writing to the TUN device failed: {e}", file=sys.stderr)


def serve_udp(sock, name, stop):
    prefix = name.encode() + b" "
    while not stop.is_set():
        try:
            data, peer = sock.recvfrom(65535)
        except socket.timeout:
            continue
        except OSError:
            if stop.is_set():
                return
            raise
        try:
            sock.sendto(prefix + data, peer)
        except OSError as e:
            print(f"backend {name}: udp reply to {fmt_addr(peer)} failed: {e}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description="vipgate test backend (HTTP + UDP)")
    ap.add_argument("--name", required=True)
    ap.add_argument(
        "--bind",
        required=True,
        action="append",
        help="address to bind (IPv4 or IPv6); repeat it to listen on several",
    )
    ap.add_argument("--http-port", type=int, default=8080)
    ap.add_argument("--udp-port", type=int, default=5353)
    ap.add_argument("--pid-file", help="write the pid here once every server listens")
    ap.add_argument("--access-log", help="append one line per HTTP request to this file")
    ap.add_argument(
        "--ipip-decap",
        metavar="TUNDEV",
        help="decapsulate IPIP in user space into this existing TUN device",
    )
    args = ap.parse_args()
    for address in args.bind:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            ap.error(f"--bind {address!r} is not an IP address")
    if len(set(args.bind)) != len(args.bind):
        ap.error(f"--bind lists an address twice: {args.bind}")

    stop = threading.Event()
    threads = []
    decap = None
    if args.ipip_decap:
        raw, tun, err = open_decap(args.ipip_decap)
        if err:
            print(f"backend {args.name}: {err}", file=sys.stderr, flush=True)
            return 1
        decap = (raw, tun)
        threads.append(threading.Thread(target=serve_decap, args=(raw, tun, args.name, stop), daemon=True))

    access_log = open(args.access_log, "a", encoding="utf-8") if args.access_log else None
    servers = []
    udps = []
    for address in args.bind:
        httpd = HTTPServer((address, args.http_port), args.name, access_log)
        servers.append(httpd)
        udp = socket.socket(family_of(address), socket.SOCK_DGRAM)
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        udp.bind((address, args.udp_port))
        udp.settimeout(0.5)
        udps.append(udp)
        threads.append(threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True))
        threads.append(threading.Thread(target=serve_udp, args=(udp, args.name, stop), daemon=True))

    def on_signal(signum, _frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    for t in threads:
        t.start()

    if args.pid_file:
        tmp = f"{args.pid_file}.tmp"
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, args.pid_file)

    listening = ", ".join(
        f"http {fmt_addr((a, args.http_port))} udp {fmt_addr((a, args.udp_port))}" for a in args.bind
    )
    decapping = f", IPIP decapsulated into {args.ipip_decap}" if decap else ""
    print(f"backend {args.name}: {listening}{decapping}, pid {os.getpid()}", file=sys.stderr, flush=True)

    while not stop.wait(1.0):
        pass

    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()
    for udp in udps:
        udp.close()
    if decap:
        decap[0].close()
    for t in threads:
        t.join(timeout=2)
    if decap:
        os.close(decap[1])
    if args.pid_file:
        try:
            os.unlink(args.pid_file)
        except FileNotFoundError:
            pass
    if access_log is not None:
        access_log.close()
    print(f"backend {args.name}: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
