#!/usr/bin/env python3
"""A test backend for vipgate's rig: HTTP and UDP on one address.

    backend.py --name NAME --bind ADDR [--http-port 8080] [--udp-port 5353]
               [--pid-file FILE] [--access-log FILE]

HTTP (HTTP/1.1, keep-alive, one thread per connection):
  GET  /            200 "backend NAME\\n", header X-Backend: NAME
  GET  /whoami      200 "backend NAME\\nclient IP:PORT\\nlocal IP:PORT\\n"
                    (the client address as the backend sees it: in NAT mode
                    it is the real client's)
  GET  /bytes?n=N   200, N bytes of the deterministic pattern below, streamed
  POST /sha256      200 "<sha256 hex of the request body> <length>\\n"
  GET  /health      200 "ok\\n"
Every response carries X-Backend: NAME and X-Client: IP:PORT.

The /bytes pattern: byte i of the body is (i % 251). 251 is prime, so the
pattern does not line up with packet or buffer sizes. A client checks a
transfer by comparing the sha256 of what it got with the sha256 of
bytes(i % 251 for i in range(N)).

UDP: every datagram is answered with b"NAME " + datagram, to its sender.

SIGTERM or SIGINT: stop both servers, remove the pid file, exit 0.
Python 3 standard library only. No per-request logging unless --access-log.
"""

import argparse
import hashlib
import http.server
import ipaddress
import os
import signal
import socket
import sys
import threading
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
        self._head(200, n, "application/octet-stream")
        if self.command == "HEAD":
            return
        view = memoryview(CHUNK)
        left = n
        while left > 0:
            take = min(left, len(CHUNK))
            self.wfile.write(view[:take])
            left -= take

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
    ap.add_argument("--bind", required=True, help="address to bind (IPv4 or IPv6)")
    ap.add_argument("--http-port", type=int, default=8080)
    ap.add_argument("--udp-port", type=int, default=5353)
    ap.add_argument("--pid-file", help="write the pid here once both servers listen")
    ap.add_argument("--access-log", help="append one line per HTTP request to this file")
    args = ap.parse_args()

    access_log = open(args.access_log, "a", encoding="utf-8") if args.access_log else None
    httpd = HTTPServer((args.bind, args.http_port), args.name, access_log)

    udp = socket.socket(family_of(args.bind), socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    udp.bind((args.bind, args.udp_port))
    udp.settimeout(0.5)

    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    threads = [
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True),
        threading.Thread(target=serve_udp, args=(udp, args.name, stop), daemon=True),
    ]
    for t in threads:
        t.start()

    if args.pid_file:
        tmp = f"{args.pid_file}.tmp"
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, args.pid_file)

    print(
        f"backend {args.name}: http {fmt_addr((args.bind, args.http_port))}, "
        f"udp {fmt_addr((args.bind, args.udp_port))}, pid {os.getpid()}",
        file=sys.stderr,
        flush=True,
    )

    while not stop.wait(1.0):
        pass

    httpd.shutdown()
    httpd.server_close()
    udp.close()
    for t in threads:
        t.join(timeout=2)
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
