#!/usr/bin/env bash
# Self-test of rig.sh and backend.py without vipgated: dpdk-testpmd stands in
# for the gateway (it creates the two net_tap interfaces and, in io forward
# mode, copies frames between them unchanged).
#
#   scripts/rig-selftest.sh
#
# Checks: up; up again (no-op); repair of a killed backend; HTTP, /bytes and
# UDP on every backend; a frame path client <-> testpmd <-> backend; down
# kills strays inside the namespaces; down twice; a second up/down cycle.
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

backend_ok() { # NAME ADDR
	local body reply
	body=$("$RIG" exec --prefix "$P" backend -- curl -s --max-time 2 "http://$2:8080/" 2>/dev/null)
	reply=$(printf 'hi' | "$RIG" exec --prefix "$P" backend -- socat -t 1 - "UDP4:$2:5353" 2>/dev/null)
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
		! pgrep -f "backend.py --name backend-[0-9]+ --bind 198.18.1." >/dev/null
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
check "second up" "$RIG" up --prefix "$P" --client-if "$CIF" --backend-if "$BIF" --backends 2
check "backend-2 answers" backend_ok backend-2 198.18.1.12
check "second down" "$RIG" down --prefix "$P"
check "nothing left" nothing_left
stop_testpmd

if ((FAILS)); then
	die "$FAILS check(s) failed"
fi
say "all checks passed"
