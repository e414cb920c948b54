#!/usr/bin/env bash
# Self-test of rig.sh and backend.py without vipgated: dpdk-testpmd stands in
# for the gateway (it creates the two net_tap interfaces and, in io forward
# mode, copies frames between them unchanged).
#
#   scripts/rig-selftest.sh
#
# Checks: up; up again (no-op); repair of a killed backend, and of one of
# two with --only-backend; HTTP, /bytes and UDP on every backend; a frame
# path client <-> testpmd <-> backend; down kills strays inside the
# namespaces; down twice; a second up/down cycle, with --no-vip-route.
# Then --mode fullnat (the backends have no route to the clients) and
# --mode dsr: every backend in its own namespace answers on its address and
# on the VIP; the client's leg in the backend LAN reaches them directly; a
# UDP request in IPIP, sent from that leg as the gateway would send it, is
# answered from the VIP straight back to the client address; down removes
# every namespace. The dsr cycle decapsulates as VIPGATE_DSR_DECAP says
# (kernel, the default, or userspace: see rig.sh).
# Leaves no namespace, process or file behind, also on failure.
set -euo pipefail

VG_TAG=rig-selftest
# shellcheck source=scripts/common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

P=vgst-
CIF=vgst-c
BIF=vgst-b
FILE_PREFIX=vgrigselftest
RIG=$VG_SCRIPTS_DIR/rig.sh
LOG=$(mktemp /tmp/vipgate-rig-selftest.XXXXXX)
TESTPMD_PID=""
FAILS=0

require_root
command -v dpdk-testpmd >/dev/null || die "dpdk-testpmd not found (apt-get install dpdk)"

stop_testpmd() {
	if pid_alive "$TESTPMD_PID"; then
		kill -INT "$TESTPMD_PID" 2>/dev/null || true
		wait "$TESTPMD_PID" 2>/dev/null || true
	fi
	TESTPMD_PID=""
	rm -rf "/var/run/dpdk/$FILE_PREFIX"
	rmdir /var/run/dpdk 2>/dev/null || true
}

cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	set +e
	"$RIG" down --prefix "$P" >/dev/null 2>&1
	stop_testpmd
	rm -f "$LOG"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

check() {
	local what=$1
	shift
	if "$@" >/dev/null 2>&1; then
		say "ok   $what"
	else
		say "FAIL $what"
		FAILS=$((FAILS + 1))
	fi
}

start_testpmd() {
	say "starting dpdk-testpmd as a stand-in gateway ($CIF, $BIF)"
	dpdk-testpmd --no-huge -m 256 --no-pci --file-prefix "$FILE_PREFIX" -l 0,1 \
		--vdev="net_tap0,iface=$CIF" --vdev="net_tap1,iface=$BIF" -- \
		--forward-mode=io --auto-start --total-num-mbufs=8192 --stats-period=3600 \
		</dev/null >"$LOG" 2>&1 &
	TESTPMD_PID=$!
}

backend_ok() { # NAME ADDR [NAMESPACE ROLE, default backend]
	local body reply role=${3:-backend}
	body=$("$RIG" exec --prefix "$P" "$role" -- curl -s --max-time 2 "http://$2:8080/" 2>/dev/null)
	reply=$(printf 'hi' | "$RIG" exec --prefix "$P" "$role" -- socat -t 1 - "UDP4:$2:5353" 2>/dev/null)
	[[ $body = "backend $1" && $reply = "$1 hi" ]]
}

bytes_ok() { # ADDR N
	local got want
	got=$("$RIG" exec --prefix "$P" backend -- curl -s --max-time 10 "http://$1:8080/bytes?n=$2" 2>/dev/null | sha256sum | cut -d' ' -f1)
	want=$(python3 -c 'import hashlib,sys; n=int(sys.argv[1]); print(hashlib.sha256(bytes(i % 251 for i in range(n))).hexdigest())' "$2")
	[[ $got = "$want" ]]
}

through_testpmd() { # the client namespace reaches a backend across both taps
	ip -n "${P}client" addr add 198.18.1.50/24 dev "$CIF" || return 1
	local body
	body=$(ip netns exec "${P}client" curl -s --max-time 3 http://198.18.1.12:8080/whoami)
	ip -n "${P}client" addr del 198.18.1.50/24 dev "$CIF"
	[[ $body = *"client 198.18.1.50:"* ]]
}

nothing_left() {
	[[ ! -e /run/netns/${P}client && ! -e /run/netns/${P}backend && ! -e $VG_RIG_STATE_ROOT/$P ]] &&
		! compgen -G "/run/netns/${P}b[0-9]*" >/dev/null &&
		! pgrep -f "backend.py --name backend-[0-9]+ .*--pid-file $VG_RIG_STATE_ROOT/$P/" >/dev/null
}

# dsr: from the client's LAN leg, a UDP request to the VIP in IPIP to the
# backend at $1 (the kernel adds the outer header of a raw IPIP socket's
# packets); the reply must come from the VIP, to the client address, on the
# leg. Prints "PEER_ADDR PEER_PORT REPLY".
IPIP_PING='
import socket, struct, sys
backend, vip, client = sys.argv[1], sys.argv[2], sys.argv[3]
sport, dport, payload = 40999, 5353, b"ipip-hi"
rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rx.bind((client, sport))
rx.settimeout(3)
udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                  socket.inet_aton(client), socket.inet_aton(vip))
words = sum(struct.unpack("!10H", hdr))
while words > 0xFFFF:
    words = (words & 0xFFFF) + (words >> 16)
hdr = hdr[:10] + struct.pack("!H", ~words & 0xFFFF) + hdr[12:]
tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, 4)
tx.sendto(hdr + udp, (backend, 0))
data, peer = rx.recvfrom(2048)
print(peer[0], peer[1], data.decode())
'

ipip_round_trip() { # BACKEND_ADDR NAME
	local got
	got=$("$RIG" exec --prefix "$P" client -- python3 -c "$IPIP_PING" "$1" "$VG_VIP" "$VG_CLIENT_ADDR" 2>/dev/null)
	[[ $got = "$VG_VIP 5353 $2 ipip-hi" ]]
}

start_testpmd
"$RIG" up --prefix "$P" --client-if "$CIF" --backend-if "$BIF" --backends 3
for i in 1 2 3; do check "backend-$i answers HTTP and UDP" backend_ok "backend-$i" "198.18.1.1$i"; done
check "/bytes?n=3000000 has the expected sha256" bytes_ok 198.18.1.11 3000000
check "client route to the VIPs" bash -c "ip -n ${P}client route show 198.18.100.0/24 | grep -q 'via 198.18.0.1'"
check "backend route to the clients" bash -c "ip -n ${P}backend route show 198.18.0.0/24 | grep -q 'via 198.18.1.1'"
check "frames cross testpmd between the namespaces" through_testpmd

say "up again on a rig that is up"
check "second up succeeds" "$RIG" up --prefix "$P" --client-if "$CIF" --backend-if "$BIF"
check "up with other settings is refused" bash -c "! '$RIG' up --prefix '$P' --client-if '$CIF' --backend-if '$BIF' --backends 2"

say "killing backend-2, then up repairs it"
kill -KILL "$(cat "$VG_RIG_STATE_ROOT/$P/backend-2.pid")"
sleep 0.3
check "up restarts the dead backend" "$RIG" up --prefix "$P" --client-if "$CIF" --backend-if "$BIF"
check "backend-2 answers again" backend_ok backend-2 198.18.1.12

say "killing backend-1 and backend-3, then up --only-backend 3 restarts backend-3 alone"
kill -KILL "$(cat "$VG_RIG_STATE_ROOT/$P/backend-1.pid")" "$(cat "$VG_RIG_STATE_ROOT/$P/backend-3.pid")"
sleep 0.3
check "up --only-backend 3" "$RIG" up --prefix "$P" --client-if "$CIF" --backend-if "$BIF" --only-backend 3
check "backend-3 answers again" backend_ok backend-3 198.18.1.13
check "backend-1 is still down" bash -c "! ip netns exec ${P}backend curl -s --max-time 1 http://198.18.1.11:8080/"
check "--only-backend beyond --backends is refused" bash -c "! '$RIG' up --prefix '$P' --client-if '$CIF' --backend-if '$BIF' --only-backend 4"
check "up repairs backend-1" "$RIG" up --prefix "$P" --client-if "$CIF" --backend-if "$BIF"
check "backend-1 answers again" backend_ok backend-1 198.18.1.11

say "a stray process inside the client namespace"
setsid ip netns exec "${P}client" sleep 600 </dev/null >/dev/null 2>&1 &
sleep 0.3
check "stray is running" bash -c "[[ -n \$(ip netns pids ${P}client) ]]"

"$RIG" down --prefix "$P"
check "down removed namespaces, state and backends" nothing_left
check "down twice is fine" "$RIG" down --prefix "$P"
stop_testpmd

say "second cycle (down deletes the taps with the namespaces: restart the stand-in)"
start_testpmd
check "second up, --no-vip-route" "$RIG" up --prefix "$P" --client-if "$CIF" --backend-if "$BIF" --backends 2 --no-vip-route
check "backend-2 answers" backend_ok backend-2 198.18.1.12
check "--no-vip-route: the client has no route to the VIPs" bash -c "! ip -n ${P}client route get $VG_VIP"
check "up without --no-vip-route is refused" bash -c "! '$RIG' up --prefix '$P' --client-if '$CIF' --backend-if '$BIF' --backends 2"
check "second down" "$RIG" down --prefix "$P"
check "nothing left" nothing_left
stop_testpmd

say "fullnat: the backends need no route to the clients"
start_testpmd
check "up --mode fullnat" "$RIG" up --prefix "$P" --client-if "$CIF" --backend-if "$BIF" --backends 2 --mode fullnat
check "backend-1 answers" backend_ok backend-1 198.18.1.11
check "the backend namespace has no route to the clients" bash -c "! ip -n ${P}backend route get $VG_CLIENT_ADDR"
check "up with another mode is refused" bash -c "! '$RIG' up --prefix '$P' --client-if '$CIF' --backend-if '$BIF' --backends 2 --mode nat"
check "down" "$RIG" down --prefix "$P"
check "nothing left" nothing_left
stop_testpmd

DSR_DECAP=${VIPGATE_DSR_DECAP:-kernel}
say "dsr (IPIP decapsulation: $DSR_DECAP): a backend LAN, one namespace per backend"
start_testpmd
# Visibly: on a kernel without IPIP, rig.sh's error says what to do.
if "$RIG" up --prefix "$P" --client-if "$CIF" --backend-if "$BIF" --backends 2 --mode dsr --dsr-decap "$DSR_DECAP"; then
	say "ok   up --mode dsr"
	for i in 1 2; do
		check "backend-$i answers on its address in ${P}b$i" backend_ok "backend-$i" "198.18.1.1$i" "b$i"
		check "backend-$i answers on the VIP in ${P}b$i" backend_ok "backend-$i" "$VG_VIP" "b$i"
		check "backend-$i routes the clients via the client's LAN leg" bash -c "ip -n ${P}b$i route get $VG_CLIENT_ADDR | grep -q 'via $VG_CLIENT_LAN_ADDR'"
	done
	check "the client reaches backend-2 over its LAN leg" bash -c "ip netns exec ${P}client curl -s --max-time 3 http://198.18.1.12:8080/whoami | grep -q 'client $VG_CLIENT_LAN_ADDR:'"
	check "a UDP request in IPIP to backend-1 is answered from the VIP, directly" ipip_round_trip 198.18.1.11 backend-1
	check "a UDP request in IPIP to backend-2 is answered from the VIP, directly" ipip_round_trip 198.18.1.12 backend-2
	check "second up --mode dsr succeeds" "$RIG" up --prefix "$P" --client-if "$CIF" --backend-if "$BIF" --backends 2 --mode dsr --dsr-decap "$DSR_DECAP"
	setsid ip netns exec "${P}b2" sleep 600 </dev/null >/dev/null 2>&1 &
	STRAY=$!
	check "down" "$RIG" down --prefix "$P"
	check "nothing left (backend namespaces included)" nothing_left
	check "down stopped a stray in ${P}b2" bash -c "! kill -0 $STRAY 2>/dev/null"
else
	say "FAIL up --mode dsr (rig.sh's error above); the other dsr checks are skipped"
	FAILS=$((FAILS + 1))
	"$RIG" down --prefix "$P" >/dev/null 2>&1 || true
fi
stop_testpmd

if ((FAILS)); then
	die "$FAILS check(s) failed"
fi
say "all checks passed"
