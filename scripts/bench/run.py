#!/usr/bin/env python3
"""Runs vipgate's dataplane benchmark and writes results.json.

Called by scripts/bench-dataplane.sh, which builds the binaries first and
renders the report afterwards; see that script for the options people use.

For every workload it generates a capture (scripts/gen-pcap.py, cached by
its arguments), then runs, one after the other and never at the same time,
on the same lcores and the same capture:

  vipgate         vipgated with port "in" = net_pcap (rx_pcap=...,infinite_rx=1)
                  and port "out" = net_null (no-rx=1), one worker per lcore
                  after the first; packet rate and cycles per packet come from
                  its counters (vipgatectl --json stats) read twice, DURATION
                  seconds apart, after WARMUP seconds;
  testpmd-io      dpdk-testpmd --forward-mode=io on the same two devices;
  testpmd-5tswap  dpdk-testpmd --forward-mode=5tswap (swaps MAC, IP and L4
                  ports: it touches the headers vipgate touches).

testpmd runs interactively, fed through a pipe: start, WARMUP, clear fwd
stats all, DURATION, show fwd stats all, stop, quit.

Memory: net_pcap's infinite_rx copies the whole capture into mbufs of the
port's pool, so every run gets a pool of (packets in the capture + 8192)
mbufs, the same for vipgate and testpmd. On hugepages, when that would leave
fewer than KEEP_FREE_PAGES pages free for other users, the pool of 2 MiB
pages is grown for the workload and shrunk back right after it (also on
failure or interruption; scripts/bench-dataplane.sh is the backstop).
Without that permission (--no-grow-hugepages) or when the kernel refuses,
the workload runs with --no-huge (4 KiB pages) for every forwarder, and the
report says so.

Every process is stopped, /var/run/dpdk/<prefix> removed and hugepage files
checked for, after every run and on any exit. Processes are stopped by their
process id only; their ids are written to STATE_DIR/pids for the backstop.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GEN_PCAP = ROOT / "scripts" / "gen-pcap.py"
HP_SYS = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")
HP_MOUNT = Path("/dev/hugepages")
DPDK_RUN = Path("/var/run/dpdk")

# One mbuf in a pool made with RTE_MBUF_DEFAULT_BUF_SIZE, as both vipgate
# and testpmd make it: 128 B rte_mbuf + 2176 B data room + 64 B mempool
# object header.
MBUF_OBJECT_BYTES = 2368
# Mbufs beyond the capture: bursts in flight, per-lcore caches, slack.
SPARE_MBUFS = 8192
# EAL, queues, rings and the rest, per process.
BASE_MEMORY_MB = 160
# Free 2 MiB pages left for other users of the machine (scripts/setup.sh's
# VIPGATE_HUGEPAGES_MIN_FREE default).
KEEP_FREE_PAGES = 256

# Test networks only (198.18.0.0/15).
# The MAC of port "in": net_pcap gives its first device 02:70:63:61:70:00
# and has no way to set another (no mac_addr_set), so the captures are
# addressed to it and each run checks that "in" has it (vipgate drops
# frames for other MACs as other_host).
PORT_IN_MAC = "02:70:63:61:70:00"
PORT_IN_ADDR = "198.18.0.1/24"
PORT_OUT_ADDR = "198.18.1.1/24"
VIP = "198.18.100.1"
BACKENDS = [f"198.18.1.{11 + i}" for i in range(8)]
BACKEND_MAC = "02:76:67:01:00:{:02x}"

FORWARDERS = ("vipgate", "testpmd-io", "testpmd-5tswap")


@dataclass(frozen=True)
class Workload:
    name: str
    proto: str
    size: object  # 64 or "imix"
    flows: int
    new_share: float
    # A SYN flood mixed in (gen-pcap.py --flood-share): that share of the
    # packets are SYNs from flood_flows spoofed tuples to FLOOD_PORT.
    flood_share: float = 0.0
    flood_flows: int = 0
    # [dataplane] flow_capacity; 0 leaves vipgated's default.
    flow_capacity: int = 0
    # IPv4 fragments per UDP datagram (gen-pcap.py --fragments); 1: none.
    fragments: int = 1
    # 802.1Q VLAN of every frame (gen-pcap.py --vlan); 0: untagged. The
    # "in" port then carries it as a [[vlans]] interface.
    vlan: int = 0

    @property
    def label(self) -> str:
        size = "IMIX" if self.size == "imix" else f"{self.size} B"
        if self.flood_share:
            return (f"{size} {self.proto.upper()}, {self.flood_share:.0%} SYN flood from {human_count(self.flood_flows)} "
                    f"spoofed tuples, {human_count(self.flows)} established flows")
        if self.fragments > 1:
            return f"{size} {self.proto.upper()}, {human_count(self.flows)} flows, datagrams in {self.fragments} fragments"
        if self.vlan:
            return f"{size} {self.proto.upper()}, {human_count(self.flows)} flows, tagged VLAN {self.vlan}"
        return f"{size} {self.proto.upper()}, {human_count(self.flows)} flow{'s' if self.flows != 1 else ''}, {self.new_share:.0%} new"

    @property
    def forwarders(self) -> tuple[str, ...]:
        # testpmd has no flows nor backends: the flood's measure is vipgate's alone.
        return ("vipgate",) if self.flood_share else FORWARDERS


FULL = [
    Workload("tcp-64-1f-new0", "tcp", 64, 1, 0.0),
    Workload("tcp-64-1f-new100", "tcp", 64, 1, 1.0),
    Workload("tcp-64-10k-new0", "tcp", 64, 10_000, 0.0),
    Workload("tcp-64-10k-new50", "tcp", 64, 10_000, 0.5),
    Workload("tcp-64-10k-new100", "tcp", 64, 10_000, 1.0),
    Workload("tcp-64-1m-new0", "tcp", 64, 1_000_000, 0.0),
    Workload("tcp-64-1m-new100", "tcp", 64, 1_000_000, 1.0),
    Workload("tcp-imix-10k-new0", "tcp", "imix", 10_000, 0.0),
    Workload("udp-64-10k", "udp", 64, 10_000, 0.0),
    Workload("udp-64-10k-frag4", "udp", 64, 10_000, 0.0, fragments=4),
    Workload("tcp-64-10k-vlan", "tcp", 64, 10_000, 0.0, vlan=100),
]
SMOKE = [Workload("smoke-tcp-64-1k-new50", "tcp", 64, 1_000, 0.5)]
# Run on its own (--workloads flood), never in the full run: it measures
# whether established flows keep their backend under a SYN flood, not a
# packet rate beside testpmd. More spoofed tuples than the flow table has
# slots, so a table that tracks half-open flows fills up.
FLOOD = [Workload("flood", "tcp", 64, 10_000, 0.0, flood_share=0.9, flood_flows=200_000, flow_capacity=65_536)]
# The flood's SYNs go to a service of their own on the VIP, so that the
# established flows' service counts only established packets.
FLOOD_PORT = 81
# The share of established-flow packets that must reach their original
# backend during the flood.
FLOOD_KEPT_MIN = 0.99
# The backends the established flows' service moves to during the flood
# (the first ones drain): a flow that lost its entry lands on one of these.
FLOOD_NEW_BACKENDS = [f"198.18.1.{21 + i}" for i in range(8)]


def human_count(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1_000 and n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


def log(msg: str) -> None:
    print(f"==> bench: {msg}", flush=True)


def warn(msg: str) -> None:
    print(f"==> bench: WARNING: {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


class Interrupted(BaseException):
    pass


def on_signal(signum, _frame):
    raise Interrupted(f"signal {signum}")


# --- State for cleanup ---------------------------------------------------------


class State:
    """What must be undone: live processes, DPDK prefixes, grown hugepages.
    Mirrored into files so that scripts/bench-dataplane.sh can finish the job
    if this process dies without running its own cleanup."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[int, subprocess.Popen] = {}
        self.prefixes: set[str] = set()
        self.grown_pages = 0
        self._write()

    def _write(self) -> None:
        (self.dir / "pids").write_text("".join(f"{p}\n" for p in self.procs))
        (self.dir / "prefixes").write_text("".join(f"{p}\n" for p in sorted(self.prefixes)))
        (self.dir / "hugepages-grown").write_text(f"{self.grown_pages}\n")

    def add_proc(self, p: subprocess.Popen) -> None:
        self.procs[p.pid] = p
        self._write()

    def drop_proc(self, p: subprocess.Popen) -> None:
        self.procs.pop(p.pid, None)
        self._write()

    def add_prefix(self, prefix: str) -> None:
        self.prefixes.add(prefix)
        self._write()

    def clean_prefix(self, prefix: str) -> list[str]:
        """Removes the runtime directory; returns problems found."""
        problems = []
        shutil.rmtree(DPDK_RUN / prefix, ignore_errors=True)
        for f in HP_MOUNT.glob(f"{prefix}map_*"):
            problems.append(f"hugepage file {f} was left behind (removed)")
            f.unlink(missing_ok=True)
        try:
            DPDK_RUN.rmdir()
        except OSError:
            pass
        self.prefixes.discard(prefix)
        self._write()
        return problems

    def set_grown(self, pages: int) -> None:
        self.grown_pages = pages
        self._write()

    def cleanup(self) -> None:
        for p in list(self.procs.values()):
            stop_process(p, 10)
            self.drop_proc(p)
        for prefix in list(self.prefixes):
            for problem in self.clean_prefix(prefix):
                warn(problem)
        if self.grown_pages:
            shrink_hugepages(self)


def stop_process(p: subprocess.Popen, timeout: float) -> int | None:
    """SIGTERM, wait, then SIGKILL; returns the exit code (None if unknown)."""
    if p.poll() is None:
        try:
            p.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            warn(f"process {p.pid} ignored SIGTERM for {timeout:.0f}s; killing it")
            p.kill()
            p.wait(30)
    return p.returncode


# --- Hugepages -------------------------------------------------------------------


def hp_read(name: str) -> int:
    return int((HP_SYS / name).read_text())


def grow_hugepages(state: State, pages: int) -> int:
    """Adds up to `pages` 2 MiB pages to the pool; returns how many the kernel gave."""
    before = hp_read("nr_hugepages")
    try:
        (HP_SYS / "nr_hugepages").write_text(str(before + pages))
    except OSError as e:
        warn(f"cannot grow the hugepage pool: {e}")
        return 0
    got = max(0, hp_read("nr_hugepages") - before)
    state.set_grown(state.grown_pages + got)
    return got


def shrink_hugepages(state: State) -> None:
    if not state.grown_pages:
        return
    now = hp_read("nr_hugepages")
    target = max(0, now - state.grown_pages)
    try:
        (HP_SYS / "nr_hugepages").write_text(str(target))
        log(f"hugepage pool back to {hp_read('nr_hugepages')} pages (had grown it by {state.grown_pages})")
    except OSError as e:
        warn(f"cannot shrink the hugepage pool back to {target} pages: {e}")
    state.set_grown(0)


# --- Captures ---------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def capture(wl: Workload, shards: int, seed: int, pcap_dir: Path, python: str) -> dict:
    """Generates (or reuses) the capture of a workload; returns its summary."""
    pcap_dir.mkdir(parents=True, exist_ok=True)
    out = pcap_dir / f"{wl.name}-seed{seed}{'' if shards == 1 else f'-{shards}q'}.pcap"
    args = ["--flows", str(wl.flows), "--size", str(wl.size), "--new-share", str(wl.new_share), "--proto", wl.proto,
            "--ipv", "4", "--seed", str(seed), "--shards", str(shards), "--dst-mac", PORT_IN_MAC, "--out", str(out)]
    if wl.fragments > 1:
        args += ["--fragments", str(wl.fragments)]
    if wl.vlan:
        args += ["--vlan", str(wl.vlan)]
    if wl.flood_share:
        args += ["--flood-share", str(wl.flood_share), "--flood-flows", str(wl.flood_flows), "--flood-dport", str(FLOOD_PORT)]
    meta_path = out.with_suffix(".json")
    key = {"args": args, "generator_sha256": file_sha256(GEN_PCAP)}
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key and all(Path(f).exists() for f in meta["summary"]["files"]):
            return meta["summary"]
    log(f"generating {wl.name}: gen-pcap.py {' '.join(args)}")
    t0 = time.monotonic()
    r = subprocess.run([python, str(GEN_PCAP), *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchError(f"gen-pcap.py failed for {wl.name}: {r.stderr.strip()}")
    summary = json.loads(r.stdout)
    summary["generate_seconds"] = round(time.monotonic() - t0, 1)
    meta_path.write_text(json.dumps({"key": key, "summary": summary}, indent=1) + "\n")
    return summary


# --- Memory plan -----------------------------------------------------------------


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def no_huge_memory(need_mb: int) -> int:
    """EAL's --no-huge heap is one fixed region, and a pool of a million mbufs
    needs about 1.7 times its size there (measured with DPDK 22.11)."""
    m = need_mb * 7 // 4 + 256
    return m + m % 2


def memory_plan(state: State, summary: dict, hugepages: bool, allow_grow: bool) -> dict:
    mbufs = summary["packets"] + SPARE_MBUFS
    rings = next_pow2(mbufs + 1) * 8 + sum(next_pow2(n + 1) * 8 for n in summary["packets_per_file"])
    need_mb = math.ceil((mbufs * MBUF_OBJECT_BYTES + rings) / 2**20) + BASE_MEMORY_MB
    need_mb += need_mb % 2
    plan = {"mbufs": mbufs, "memory_mb": need_mb, "pages": "2 MiB" if hugepages else "4 KiB", "grown_pages": 0, "note": ""}
    if not hugepages:
        plan["note"] = "VIPGATE_HUGEPAGES=0: every run uses --no-huge"
        plan["memory_mb"] = no_huge_memory(need_mb)
        return plan
    need_pages = need_mb // 2
    free = hp_read("free_hugepages")
    short = need_pages + KEEP_FREE_PAGES - free
    if short <= 0:
        return plan
    if allow_grow:
        got = grow_hugepages(state, short)
        plan["grown_pages"] = got
        if got >= short:
            log(f"hugepage pool grown by {got} pages for this workload (needs {need_pages}, {free} were free)")
            return plan
        shrink_hugepages(state)
        plan["grown_pages"] = 0
        plan["note"] = f"the kernel gave {got} of the {short} extra 2 MiB pages needed"
    else:
        plan["note"] = f"needs {need_pages} 2 MiB pages, {free} free, growing the pool not allowed"
    plan["pages"] = "4 KiB"
    plan["memory_mb"] = no_huge_memory(need_mb)
    warn(f"this workload runs with --no-huge (4 KiB pages): {plan['note']}")
    return plan


# --- Runs ------------------------------------------------------------------------


def eal_memory_args(plan: dict) -> list[str]:
    if plan["pages"] == "2 MiB":
        return ["--huge-unlink"]
    return ["--no-huge", "-m", str(plan["memory_mb"])]


def pcap_device(files: list[str]) -> str:
    return "net_pcap0," + ",".join(f"rx_pcap={f}" for f in files) + ",infinite_rx=1"


def lcore_list(lcores: list[int], workers: int) -> str:
    """The main lcore and the first `workers` worker lcores, main first."""
    return ",".join(str(i) for i in lcores[: workers + 1])


def read_loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def cpu_times(cpus: list[int]) -> dict[int, list[int]]:
    """Jiffies per CPU from /proc/stat: user nice system idle iowait irq softirq steal."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        m = re.match(r"cpu(\d+)\s+(.*)", line)
        if m and int(m.group(1)) in cpus:
            out[int(m.group(1))] = [int(x) for x in m.group(2).split()[:8]]
    return out


def worker_threads(pid: int) -> list[int]:
    """Thread ids of a DPDK process's worker lcores (EAL names them rte-worker-N)."""
    out = []
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            if t.joinpath("comm").read_text().strip().startswith(("rte-worker", "lcore-worker")):
                out.append(int(t.name))
        except OSError:
            pass
    return sorted(out)


def sched_times(pid: int, tids: list[int]) -> tuple[int, int] | None:
    """Nanoseconds the threads ran, and waited runnable for a CPU (/proc/.../schedstat)."""
    run = wait = 0
    try:
        for tid in tids:
            f = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
            run += int(f[0])
            wait += int(f[1])
    except (OSError, IndexError, ValueError):
        return None
    return run, wait


def sched_share(before, after, seconds: float, threads: int) -> dict:
    """The worker threads' share of their CPUs over the window: running, and
    runnable but waiting because something else had the CPU."""
    if not (before and after and seconds > 0 and threads):
        return {"cpu_share": None, "wait_share": None}
    wall = seconds * 1e9 * threads
    return {"cpu_share": round((after[0] - before[0]) / wall, 4), "wait_share": round((after[1] - before[1]) / wall, 4)}


def steal_share(before: dict, after: dict) -> float | None:
    """Share of the worker CPUs' time the hypervisor gave to someone else."""
    total = steal = 0
    for cpu, a in after.items():
        b = before.get(cpu)
        if not b:
            continue
        d = [x - y for x, y in zip(a, b)]
        total += sum(d)
        steal += d[7]
    return round(steal / total, 4) if total else None


def vipgate_config(ctx: dict, wl: Workload, summary: dict, plan: dict, workers: int, prefix: str, socket: Path,
                   web: list[tuple[str, int]]) -> str:
    """vipgated's configuration; `web` is the TCP service's backends (address, weight)."""
    hp = plan["pages"] == "2 MiB"
    lines = [
        "# vipgate dataplane benchmark configuration, written by scripts/bench/run.py.",
        "[eal]",
        f'lcores = "{lcore_list(ctx["lcores"], workers)}"',
        f"hugepages = {'true' if hp else 'false'}",
    ]
    if not hp:
        lines.append(f"memory_mb = {plan['memory_mb']}")
    lines += [
        f'file_prefix = "{prefix}"',
        "",
        "[dataplane]",
        f"mbufs = {plan['mbufs']}",
        "mbuf_cache = 256",
        "idle_sleep_us = 0",
    ]
    if wl.flow_capacity:
        lines.append(f"flow_capacity = {wl.flow_capacity}")
    lines += [
        "",
        "[api]",
        f'socket = "{socket}"',
        "",
        "# Its own state directory: the API changes of a run never reach the",
        "# host's default one, and runs never share a lock.",
        "[state]",
        f'dir = "{Path(socket).parent / "state"}"',
        "",
        "[[ports]]",
        'name = "in"',
        f'device = "{pcap_device(summary["files"])}"',
        f'addresses = ["{PORT_IN_ADDR}"]',
        "# No exception path: the benchmark measures the fast path alone.",
        'kernel_interface = ""',
        "",
        "[[ports]]",
        'name = "out"',
        'device = "net_null0,no-rx=1"',
        f'addresses = ["{PORT_OUT_ADDR}"]',
        'kernel_interface = ""',
        "",
    ]

    if wl.vlan:
        lines += ["[[vlans]]", 'name = "in-vlan"', 'port = "in"', f"id = {wl.vlan}", 'addresses = ["198.18.50.1/24"]', ""]

    def backend_list(backends: list[tuple[str, int]], port: int) -> str:
        return "backends = [" + ", ".join(f'{{ address = "{b}", port = {port}, weight = {w} }}' for b, w in backends) + "]"

    services = [("web", "tcp", 80, 8080, web)]
    if wl.flood_share:
        services.append(("syn", "tcp", FLOOD_PORT, 8081, [(b, 1) for b in BACKENDS]))
    else:
        services.append(("dns", "udp", 53, 5353, [(b, 1) for b in BACKENDS]))
    for name, proto, port, bport, backends in services:
        lines += ["[[services]]", f'name = "{name}"', f'vip = "{VIP}"', f"port = {port}", f'protocol = "{proto}"',
                  backend_list(backends, bport), ""]
    neighbours = BACKENDS + (FLOOD_NEW_BACKENDS if wl.flood_share else [])
    for b in neighbours:
        lines += ["[[neighbours]]", f'address = "{b}"', f'mac = "{BACKEND_MAC.format(int(b.rsplit(".", 1)[1]))}"', ""]
    return "\n".join(lines)


def run_vipgate(ctx: dict, wl: Workload, summary: dict, plan: dict, workers: int, prefix: str, rundir: Path) -> dict:
    state: State = ctx["state"]
    socket = rundir / "vipgated.sock"
    conf = rundir / "vipgated.toml"
    conf.write_text(vipgate_config(ctx, wl, summary, plan, workers, prefix, socket, [(b, 1) for b in BACKENDS]))

    vipgated, vipgatectl = ctx["vipgated"], ctx["vipgatectl"]
    r = subprocess.run([vipgated, "--config", str(conf), "--check"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise BenchError(f"vipgated refuses the benchmark configuration {conf}: {r.stderr.strip() or r.stdout.strip()}")

    logf = rundir / "vipgated.log"
    env = dict(os.environ, VIPGATE_LOG=os.environ.get("VIPGATE_LOG", "info"))
    state.add_prefix(prefix)
    with open(logf, "wb") as lf:
        p = subprocess.Popen([vipgated, "--config", str(conf)], stdin=subprocess.DEVNULL, stdout=lf, stderr=subprocess.STDOUT,
                             start_new_session=True, env=env)
    state.add_proc(p)
    result: dict = {"log": str(logf), "config": str(conf)}
    try:
        def ctl(*args: str) -> dict:
            r = subprocess.run([vipgatectl, "--socket", str(socket), "--json", *args], capture_output=True, text=True,
                               stdin=subprocess.DEVNULL, timeout=20)
            if r.returncode != 0:
                raise BenchError(f"vipgatectl {' '.join(args)}: {r.stderr.strip()}")
            return json.loads(r.stdout)

        t_start = time.monotonic()
        while True:
            if p.poll() is not None:
                raise BenchError(f"vipgated exited with {p.returncode} during start-up; last lines of {logf}:\n{tail(logf)}")
            if socket.exists():
                try:
                    if ctl("health").get("serving"):
                        break
                except BenchError:
                    pass
            if time.monotonic() - t_start > ctx["start_timeout"]:
                raise BenchError(f"vipgated not serving after {ctx['start_timeout']}s; last lines of {logf}:\n{tail(logf)}")
            time.sleep(0.2)
        result["startup_seconds"] = round(time.monotonic() - t_start, 1)
        in_mac = next((q.get("mac") for q in ctl("stats").get("ports", []) if q.get("name") == "in"), None)
        if in_mac is None or in_mac.lower() != PORT_IN_MAC:
            raise BenchError(f'port "in" has MAC {in_mac}, but the capture is addressed to {PORT_IN_MAC}: '
                             "vipgate would drop every frame as other_host")
        time.sleep(ctx["warmup"])

        def sample() -> tuple[dict, float]:
            a = time.monotonic()
            s = ctl("stats")
            b = time.monotonic()
            return s, (a + b) / 2

        cpus = ctx["lcores"][1: workers + 1]
        tids = worker_threads(p.pid)
        c0 = cpu_times(cpus)
        q0 = sched_times(p.pid, tids)
        s0, t0 = sample()
        if wl.flood_share:
            l0 = ctl("list")
            # The established flows' service moves to new backends (the old
            # ones drain): a flow that keeps its entry stays on its backend,
            # one that lost it is chosen anew, among the new backends only.
            conf.write_text(vipgate_config(ctx, wl, summary, plan, workers, prefix, socket,
                                           [(b, 0) for b in BACKENDS] + [(b, 1) for b in FLOOD_NEW_BACKENDS]))
            result["reload_seconds"] = reload(p, logf)
        time.sleep(max(0.0, ctx["duration"] - (time.monotonic() - t0)))
        s1, t1 = sample()
        if wl.flood_share:
            l1 = ctl("list")
        q1 = sched_times(p.pid, tids)
        c1 = cpu_times(cpus)
    finally:
        rc = stop_process(p, 60)
        state.drop_proc(p)
        problems = state.clean_prefix(prefix)
    seconds = t1 - t0

    def delta(a: dict, b: dict, key: str) -> int:
        return b[key] - a[key]

    tot0, tot1 = s0["total"], s1["total"]
    rx = delta(tot0, tot1, "rx_packets")
    drops = {k: v - tot0["drops"].get(k, 0) for k, v in tot1["drops"].items() if v - tot0["drops"].get(k, 0)}
    ports = {}
    for a, b in zip(s0["ports"], s1["ports"]):
        ports[b["name"]] = {k: b[k] - a[k] for k in ("ipackets", "opackets", "imissed", "ierrors", "oerrors", "rx_nombuf")}
    result.update({
        "seconds": round(seconds, 3),
        "rx_packets": rx,
        "tx_packets": delta(tot0, tot1, "tx_packets"),
        "rx_bytes": delta(tot0, tot1, "rx_bytes"),
        "nat_forward": delta(tot0, tot1, "nat_forward"),
        "busy_polls": delta(tot0, tot1, "busy_polls"),
        "busy_cycles": delta(tot0, tot1, "busy_cycles"),
        "mpps": round(rx / seconds / 1e6, 4) if seconds > 0 else 0.0,
        "cycles_per_packet": round(delta(tot0, tot1, "busy_cycles") / rx, 2) if rx else None,
        "drops": drops,
        "drops_total": sum(drops.values()),
        "ports": ports,
        "per_worker": [
            {"lcore": b["lcore"], "rx_packets": b["rx_packets"] - a["rx_packets"], "busy_cycles": b["busy_cycles"] - a["busy_cycles"]}
            for a, b in zip(s0["workers"], s1["workers"])
        ],
        "steal_share": steal_share(c0, c1),
        "worker_threads": len(tids),
        **sched_share(q0, q1, seconds, len(tids)),
        "exit_code": rc,
        "cleanup_problems": problems,
        "mempool": s1.get("mempool", {}),
    })
    if wl.flood_share:
        result["flood"] = flood_figures(s0, s1, l0, l1)
    return result


def reload(p: subprocess.Popen, logf: Path, timeout: float = 30.0) -> float:
    """SIGHUP to vipgated (its configuration file rewritten); waits for the
    log to report one more applied reload; returns how long that took."""
    def count(what: str) -> int:
        return logf.read_text(errors="replace").count(what)

    before = count("configuration reloaded")
    t = time.monotonic()
    p.send_signal(signal.SIGHUP)
    while count("configuration reloaded") == before:
        if count("reload refused"):
            raise BenchError(f"vipgated refused the reload; see {logf}")
        if time.monotonic() - t > timeout:
            raise BenchError(f"no reload within {timeout:.0f}s of SIGHUP; see {logf}")
        time.sleep(0.05)
    return round(time.monotonic() - t, 3)


def flood_figures(s0: dict, s1: dict, l0: dict, l1: dict) -> dict:
    """What the flood workload measures, from two reads of the counters
    (stats) and of the services (list), before the established flows'
    backends changed and at the end of the window.

    Every packet of service "web" is an established-flow packet (the flood
    goes to "syn"). Before the change every backend choice was the
    original one (Maglev picks the same backend again for a flow that lost
    its entry while the backends were unchanged); after it, a flow that
    lost its entry is chosen anew among the new backends only, since the
    original ones drain. So the new backends' packets are exactly the
    established packets not forwarded to their original backend."""
    def service(listing: dict, name: str) -> dict:
        return next((x for x in listing["services"] if x["name"] == name), {"backends": []})

    def backend_packets(listing: dict, addresses: list[str] | None = None) -> int:
        return sum(b["stats"]["in_packets"] for b in service(listing, "web")["backends"]
                   if addresses is None or b["address"] in addresses)

    established = backend_packets(l1) - backend_packets(l0)
    moved = backend_packets(l1, FLOOD_NEW_BACKENDS)
    syn = service(l1, "syn").get("stats", {}).get("in_packets", 0) - service(l0, "syn").get("stats", {}).get("in_packets", 0)
    tot0, tot1 = s0["total"], s1["total"]
    return {
        "established_packets": established,
        "established_elsewhere": moved,
        "established_to_original_share": round(1 - moved / established, 6) if established else None,
        "flood_packets": syn,
        "flows_active_before": tot0["flows_active"],
        "flows_active_after": tot1["flows_active"],
        "flows_created": tot1["flows_created"] - tot0["flows_created"],
        "flows_evicted": tot1["flows_evicted"] - tot0["flows_evicted"],
        "flows_rehashed": tot1["flows_rehashed"] - tot0["flows_rehashed"],
    }


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join("    " + line for line in path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "    (no log)"


class TestpmdSession:
    """dpdk-testpmd in interactive mode, driven through its stdin."""

    PROMPT = b"testpmd> "

    def __init__(self, args: list[str], logf: Path, state: State) -> None:
        self.logf = open(logf, "wb")
        self.buf = bytearray()
        self.prompts: list[tuple[int, float]] = []  # (offset in buf after the prompt, time seen)
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        state.add_proc(self.proc)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        fd = self.proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            now = time.monotonic()
            with self.cond:
                if not chunk:
                    self.cond.notify_all()
                    break
                start = max(0, len(self.buf) - len(self.PROMPT) + 1)
                self.buf += chunk
                self.logf.write(chunk)
                i = self.buf.find(self.PROMPT, start)
                while i >= 0:
                    self.prompts.append((i + len(self.PROMPT), now))
                    i = self.buf.find(self.PROMPT, i + len(self.PROMPT))
                self.cond.notify_all()
        self.logf.flush()

    def wait_prompt(self, n: int, timeout: float) -> tuple[int, float]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.prompts) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"dpdk-testpmd: no prompt #{n} within {timeout:.0f}s; see {self.logf.name}")
                if self.proc.poll() is not None and not self.reader.is_alive():
                    raise BenchError(f"dpdk-testpmd exited with {self.proc.returncode}; see {self.logf.name}:\n"
                                     + "\n".join("    " + x for x in self.buf.decode(errors="replace").splitlines()[-15:]))
                self.cond.wait(min(left, 0.5))
            return self.prompts[n - 1]

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def text(self, start: int, end: int) -> str:
        with self.cond:
            return self.buf[start:end].decode(errors="replace")

    def close(self) -> int | None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            stop_process(self.proc, 10)
        self.reader.join(5)
        self.logf.close()
        return self.proc.returncode


def parse_fwd_stats(text: str) -> dict:
    acc = text.split("Accumulated forward statistics", 1)
    if len(acc) != 2:
        raise BenchError("dpdk-testpmd printed no accumulated forward statistics")
    block = acc[1]
    num = lambda key: int(re.search(rf"{key}:\s*(\d+)", block).group(1))  # noqa: E731
    out = {"rx_packets": num("RX-packets"), "rx_dropped": num("RX-dropped"), "tx_packets": num("TX-packets"),
           "tx_dropped": num("TX-dropped")}
    m = re.search(r"CPU cycles/packet=([\d.]+) \((?:busy|total) cycles=(\d+) / total \S+ packets=(\d+)\) at (\d+) MHz", text)
    if m:
        out.update({"cycles_per_packet": float(m.group(1)), "busy_cycles": int(m.group(2)), "tsc_mhz": int(m.group(4))})
    return out


def run_testpmd(ctx: dict, mode: str, summary: dict, plan: dict, workers: int, prefix: str, rundir: Path) -> dict:
    state: State = ctx["state"]
    args = [
        "stdbuf", "-oL", ctx["testpmd"],
        "-l", lcore_list(ctx["lcores"], workers), "--main-lcore", str(ctx["lcores"][0]), "--no-pci", "--file-prefix", prefix, *eal_memory_args(plan),
        "--vdev", pcap_device(summary["files"]), "--vdev", "net_null0,no-rx=1",
        "--", "-i", f"--forward-mode={mode}", f"--nb-cores={workers}", f"--rxq={workers}", f"--txq={workers}",
        "--record-core-cycles", "--no-flush-rx", f"--total-num-mbufs={plan['mbufs']}", "--mbcache=256",
        "--rxd=1024", "--txd=1024", "--burst=32",
    ]
    logf = rundir / f"testpmd-{mode}.log"
    state.add_prefix(prefix)
    t_start = time.monotonic()
    s = TestpmdSession(args, logf, state)
    result: dict = {"log": str(logf), "command": " ".join(args[2:])}
    try:
        s.wait_prompt(1, ctx["start_timeout"])
        result["startup_seconds"] = round(time.monotonic() - t_start, 1)
        s.send("start")
        s.wait_prompt(2, 30)
        time.sleep(ctx["warmup"])
        cpus = ctx["lcores"][1: workers + 1]
        tids = worker_threads(s.proc.pid)
        c0 = cpu_times(cpus)
        q0 = sched_times(s.proc.pid, tids)
        s.send("clear fwd stats all")
        _, t0 = s.wait_prompt(3, 30)
        time.sleep(max(0.0, ctx["duration"] - (time.monotonic() - t0)))
        s.send("show fwd stats all")
        off1, t1 = s.wait_prompt(4, 30)
        q1 = sched_times(s.proc.pid, tids)
        c1 = cpu_times(cpus)
        off0 = s.prompts[2][0]
        stats = parse_fwd_stats(s.text(off0, off1))
        s.send("stop")
        s.wait_prompt(5, 30)
        s.send("quit")
    finally:
        rc = s.close()
        state.drop_proc(s.proc)
        problems = state.clean_prefix(prefix)
    seconds = t1 - t0
    result.update(stats)
    result.update({
        "seconds": round(seconds, 3),
        "mpps": round(stats["rx_packets"] / seconds / 1e6, 4) if seconds > 0 else 0.0,
        "drops_total": stats["rx_dropped"] + stats["tx_dropped"],
        "steal_share": steal_share(c0, c1),
        "worker_threads": len(tids),
        **sched_share(q0, q1, seconds, len(tids)),
        "exit_code": rc,
        "cleanup_problems": problems,
    })
    return result


# --- Checks ----------------------------------------------------------------------


def sanity(name: str, runs: dict) -> list[str]:
    """What is wrong with a workload's numbers; empty when they are sane."""
    bad = []
    v = runs.get("vipgate")
    if v:
        if v["rx_packets"] <= 0:
            bad.append(f"{name}: vipgate received nothing")
        if v["drops_total"]:
            bad.append(f"{name}: vipgate dropped packets: {v['drops']}")
        if v["rx_packets"] and abs(v["tx_packets"] - v["rx_packets"]) > 64 * max(1, len(v["per_worker"])):
            bad.append(f"{name}: vipgate sent {v['tx_packets']} of {v['rx_packets']} packets received")
        if v["exit_code"] != 0:
            bad.append(f"{name}: vipgated exited with {v['exit_code']} (see {v['log']})")
        fl = v.get("flood")
        if fl is not None:
            if fl["established_packets"] <= 0 or fl["flood_packets"] <= 0:
                bad.append(f"{name}: the window saw {fl['established_packets']} established and {fl['flood_packets']} flood packets")
            elif fl["established_to_original_share"] < FLOOD_KEPT_MIN:
                bad.append(f"{name}: {fl['established_to_original_share']:.2%} of the established-flow packets went to their "
                           f"original backend, under the {FLOOD_KEPT_MIN:.0%} required "
                           f"({fl['established_elsewhere']} of {fl['established_packets']} went elsewhere)")
        bad += [f"{name}: vipgate: {p}" for p in v["cleanup_problems"]]
    for fw in ("testpmd-io", "testpmd-5tswap"):
        t = runs.get(fw)
        if t:
            if t["rx_packets"] <= 0:
                bad.append(f"{name}: {fw} received nothing")
            if t["drops_total"]:
                bad.append(f"{name}: {fw} dropped {t['drops_total']} packets")
            if t["exit_code"] != 0:
                bad.append(f"{name}: dpdk-testpmd ({fw}) exited with {t['exit_code']} (see {t['log']})")
            bad += [f"{name}: {fw}: {p}" for p in t["cleanup_problems"]]
    return bad


# --- Machine ---------------------------------------------------------------------


def cmd_out(*args: str) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_info() -> dict:
    lscpu = {}
    for line in cmd_out("lscpu").splitlines():
        k, _, v = line.partition(":")
        lscpu[k.strip()] = v.strip()
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    rev = cmd_out("git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD")
    dirty = bool(cmd_out("git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"))
    return {
        "cpu_model": lscpu.get("Model name", platform.processor()),
        "cpu_family_model": f"family {lscpu.get('CPU family', '?')} model {lscpu.get('Model', '?')} stepping {lscpu.get('Stepping', '?')}",
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "hypervisor": lscpu.get("Hypervisor vendor", "none"),
        "l2_cache": lscpu.get("L2 cache", "?"),
        "l3_cache": lscpu.get("L3 cache", "?"),
        "memory_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "os": cmd_out("sh", "-c", ". /etc/os-release && echo \"$PRETTY_NAME\""),
        "dpdk_version": cmd_out("pkg-config", "--modversion", "libdpdk"),
        "dpdk_package": cmd_out("dpkg-query", "-W", "-f=${Version}", "dpdk"),
        "rustc": cmd_out("rustc", "--version"),
        "git_revision": rev + (" (with uncommitted changes)" if dirty else ""),
    }


# --- Main ------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="Runs vipgate's dataplane benchmark (see scripts/bench-dataplane.sh).")
    ap.add_argument("--out", required=True, help="results directory (results.json, run logs)")
    ap.add_argument("--pcap-dir", help="where captures are generated and cached (default OUT/pcap)")
    ap.add_argument("--bin-dir", required=True, help="directory holding vipgated and vipgatectl")
    ap.add_argument("--smoke", action="store_true", help="one small workload; fail on any insane number")
    ap.add_argument("--duration", type=float, default=8.0, help="measured seconds per run (default 8)")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of traffic before measuring (default 2)")
    ap.add_argument("--workloads", help="comma-separated workload names (default: all); see --list")
    ap.add_argument("--workers", default="1,2", help="worker counts to run (default 1,2)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--lcores", default="",
                    help="CPUs to use, the main lcore first, then one per worker (default: 0, 1, 2, ... as needed)")
    ap.add_argument("--no-grow-hugepages", action="store_true", help="never grow the hugepage pool; use --no-huge instead")
    ap.add_argument("--start-timeout", type=float, default=180.0)
    ap.add_argument("--command", default="", help="the command line to record in the results")
    ap.add_argument("--list", action="store_true", help="list the workloads and exit")
    a = ap.parse_args(argv)

    catalogue = SMOKE if a.smoke else FULL
    if a.list:
        for w in FULL + SMOKE + FLOOD:
            print(f"{w.name:24} {w.label}")
        return 0
    if a.workloads:
        by_name = {w.name: w for w in FULL + SMOKE + FLOOD}
        unknown = [n for n in a.workloads.split(",") if n not in by_name]
        if unknown:
            ap.error(f"unknown workload(s): {', '.join(unknown)} (see --list)")
        catalogue = [by_name[n] for n in a.workloads.split(",")]
    try:
        worker_counts = sorted({int(x) for x in a.workers.split(",")})
    except ValueError:
        ap.error("--workers takes a list such as 1,2")
    if not worker_counts or min(worker_counts) < 1:
        ap.error("--workers takes positive counts")

    out = Path(a.out).resolve()
    pcap_dir = Path(a.pcap_dir).resolve() if a.pcap_dir else out / "pcap"
    for p in (out, pcap_dir):
        if re.search(r"[\s,=\"']", str(p)):
            ap.error(f"{p}: the path must not contain spaces, commas, '=' or quotes (it goes into DPDK device arguments)")
    out.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(a.bin_dir).resolve()
    ctx = {
        "vipgated": str(bin_dir / "vipgated"),
        "vipgatectl": str(bin_dir / "vipgatectl"),
        "testpmd": shutil.which("dpdk-testpmd") or "dpdk-testpmd",
        "duration": a.duration,
        "warmup": a.warmup,
        "start_timeout": a.start_timeout,
    }
    for b in ("vipgated", "vipgatectl"):
        if not os.access(ctx[b], os.X_OK):
            raise SystemExit(f"bench: {ctx[b]} is missing; build it first (cargo build -p vipgate-daemon -p vipgate-controlplane)")
    hugepages = os.environ.get("VIPGATE_HUGEPAGES", "1") == "1" and HP_SYS.exists()

    state = State(Path(os.environ.get("VG_BENCH_STATE_DIR", out / ".state")))
    ctx["state"] = state
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    usable = len(os.sched_getaffinity(0))
    try:
        lcores = [int(x) for x in a.lcores.split(",")] if a.lcores else sorted(os.sched_getaffinity(0))
    except ValueError:
        ap.error("--lcores takes a list such as 0,1")
    if len(set(lcores)) != len(lcores) or any(c not in os.sched_getaffinity(0) for c in lcores):
        ap.error(f"--lcores {a.lcores}: CPUs must be distinct and usable by this process")
    ctx["lcores"] = lcores
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": a.command or "scripts/bench/run.py " + " ".join(argv),
        "mode": "smoke" if a.smoke else "full",
        "duration_s": a.duration,
        "warmup_s": a.warmup,
        "seed": a.seed,
        "lcores": lcores,
        "hugepages": "2 MiB" if hugepages else "4 KiB (--no-huge)",
        "vipgated": ctx["vipgated"],
        "profile": bin_dir.name,
        "testpmd": ctx["testpmd"],
        "machine": machine_info(),
        "skipped": [],
    }
    results = {"meta": meta, "runs": []}
    failures: list[str] = []
    python = sys.executable
    t_all = time.monotonic()
    try:
        for workers in worker_counts:
            if workers + 1 > len(lcores):
                note = (f"{workers} worker{'s' if workers > 1 else ''}: skipped: needs {workers + 1} cores "
                        f"(1 control plane + {workers} worker{'s' if workers > 1 else ''}); "
                        + (f"this machine has {usable}" if usable < workers + 1 else f"--lcores names {len(lcores)}"))
                meta["skipped"].append(note)
                log(note)
                continue
            for wl in catalogue:
                summary = capture(wl, workers, a.seed, pcap_dir, python)
                plan = memory_plan(state, summary, hugepages, not a.no_grow_hugepages)
                entry = {"workload": asdict(wl), "name": wl.name, "label": wl.label, "workers": workers,
                         "capture": summary, "memory": plan, "load_before": read_loadavg(), "runs": {}, "errors": []}
                results["runs"].append(entry)
                log(f"{wl.name} ({wl.label}), {workers} worker(s): {summary['packets']} packets, {plan['mbufs']} mbufs, "
                    f"{plan['pages']} pages, load {entry['load_before']}")
                rundir = out / "runs" / f"{wl.name}-w{workers}"
                rundir.mkdir(parents=True, exist_ok=True)
                try:
                    for fw in wl.forwarders:
                        prefix = f"vgbench{os.getpid()}{fw.replace('testpmd-', 't')}"
                        try:
                            if fw == "vipgate":
                                r = run_vipgate(ctx, wl, summary, plan, workers, prefix, rundir)
                            else:
                                r = run_testpmd(ctx, fw.split("-", 1)[1], summary, plan, workers, prefix, rundir)
                        except BenchError as e:
                            # The other forwarders still run: their numbers are still worth having.
                            entry["errors"].append(f"{fw}: {e}")
                            warn(f"{wl.name}: {fw}: {e}")
                            continue
                        entry["runs"][fw] = r
                        cpu = r.get("cpu_share")
                        log(f"  {fw:15} {r['mpps']:8.3f} Mpps  {fmt(r.get('cycles_per_packet'))} cycles/packet  "
                            f"drops {r['drops_total']}  ({r['seconds']:.2f} s measured, worker on CPU "
                            f"{'?' if cpu is None else f'{100 * cpu:.0f}%'})")
                finally:
                    if plan["grown_pages"]:
                        shrink_hugepages(state)
                v, t5 = entry["runs"].get("vipgate"), entry["runs"].get("testpmd-5tswap")
                tio = entry["runs"].get("testpmd-io")
                if v and t5 and t5["mpps"]:
                    entry["ratio_vs_5tswap"] = round(v["mpps"] / t5["mpps"], 3)
                if v and tio and tio["mpps"]:
                    entry["ratio_vs_io"] = round(v["mpps"] / tio["mpps"], 3)
                entry["problems"] = sanity(f"{wl.name} ({workers}w)", entry["runs"]) + [
                    f"{wl.name} ({workers}w): {e.splitlines()[0]}" for e in entry["errors"]]
                failures += entry["problems"]
                (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    except Interrupted as e:
        warn(f"interrupted ({e}); cleaning up")
        state.cleanup()
        return 130
    finally:
        state.cleanup()
        meta["total_seconds"] = round(time.monotonic() - t_all, 1)
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    log(f"results: {out / 'results.json'} ({meta['total_seconds']} s)")
    if failures:
        for f in failures:
            warn(f)
        return 1
    return 0


def fmt(x) -> str:
    return f"{x:7.1f}" if isinstance(x, (int, float)) else "      -"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
