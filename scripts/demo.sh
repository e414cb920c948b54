#!/usr/bin/env bash
# The vipgate demo: one gateway, a client namespace, three backends.
#
#   scripts/demo.sh              set up, build, run the demo, tear down
#   scripts/demo.sh --keep       run it and leave everything running
#   scripts/demo.sh --down       tear down what --keep left running
#   scripts/demo.sh --requests N send N HTTP requests (default 300)
#   scripts/demo.sh --no-build   use the binaries already built
#   scripts/demo.sh --k8s        the same through Kubernetes: a real
#                                kube-apiserver on loopback, vipgate-k8s, and
#                                a Service of type LoadBalancer applied with
#                                kubectl; the requests go to its EXTERNAL-IP,
#                                and the Service is deleted at the end
#
# VIPGATED_BIN / VIPGATECTL_BIN in the environment override the binaries' paths
# (default: the release binaries under cargo's target directory).
#
# Steps: setup.sh (packages, hugepages); release build of vipgated and
# vipgatectl; a demo configuration (VIP 198.18.100.1, TCP 80 and UDP 5353 to
# three backends, nat mode); vipgated in the background; rig.sh up (client
# and backend namespaces on the gateway's net_tap interfaces); N HTTP
# requests with curl from the client namespace, counted per backend; one UDP
# request with socat; vipgatectl stats; teardown.
#
# Exits non-zero if any request failed, a backend got no request, the UDP
# request got no answer, or vipgated did not stop cleanly. Cleans up after
# itself on any failure or interruption, and cleans leftovers of a previous
# run before it starts. Must run as root.
set -euo pipefail

VG_TAG=demo
# shellcheck source=scripts/common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

PREFIX=vgdemo-
CLIENT_NS=${PREFIX}client
BACKEND_NS=${PREFIX}backend
CLIENT_IF=vgd-c
BACKEND_IF=vgd-b
FILE_PREFIX=vgdemo
BACKENDS=3
SOCKET=$VG_ENV_DIR/demo.sock
STATE=/run/vipgate-demo
CONF=$STATE/vipgated.toml
LOG=$STATE/vipgated.log
PIDFILE=$STATE/vipgated.pid
FAILED_LOG=${TMPDIR:-/tmp}/vipgate-demo-failed.log
RIG=$VG_SCRIPTS_DIR/rig.sh
REQUESTS=300
KEEP=0
BUILD=1
MODE=run
K8S=0


while (($#)); do
	case $1 in
	--keep) KEEP=1 && shift ;;
	--down) MODE=down && shift ;;
	--no-build) BUILD=0 && shift ;;
	--k8s) K8S=1 && shift ;;
	--requests)
		(($# >= 2)) || die "--requests needs a number"
		REQUESTS=$2 && shift 2
		;;
	--requests=*) REQUESTS=${1#*=} && shift ;;
	-h | --help) usage && exit 0 ;;
	*) die "unknown argument: $1 (scripts/demo.sh --help)" ;;
	esac
done
[[ $REQUESTS =~ ^[1-9][0-9]*$ ]] || die "--requests must be a positive number"

require_root
cd "$VG_ROOT"

TARGET_DIR=$(cargo_target_dir)
VIPGATED=${VIPGATED_BIN:-$TARGET_DIR/release/vipgated}
VIPGATECTL=${VIPGATECTL_BIN:-$TARGET_DIR/release/vipgatectl}
DAEMON_PID=""
DAEMON_IS_CHILD=0
KEEP_RUNNING=0
TEARDOWN_PROBLEMS=0
# shellcheck source=scripts/demo-k8s.sh
source "$VG_SCRIPTS_DIR/demo-k8s.sh"

# --- teardown ----------------------------------------------------------------

# Is PID the vipgated this script started (and not a recycled pid)?
is_our_daemon() {
	local pid=$1 cmdline
	pid_alive "$pid" || return 1
	cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
	[[ $cmdline = *" --config $CONF"* ]]
}

stop_daemon() {
	local pid=$1 i status
	say "stopping vipgated (pid $pid) with SIGTERM"
	kill -TERM "$pid" 2>/dev/null || true
	if ((DAEMON_IS_CHILD)); then
		for ((i = 0; i < 200; i++)); do
			pid_alive "$pid" || break
			# A zombie child is gone for our purpose; wait reaps it below.
			[[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) = Z ]] && break
			sleep 0.1
		done
		if pid_alive "$pid" && [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]]; then
			warn "vipgated did not stop within 20s; sending SIGKILL"
			kill -KILL "$pid" 2>/dev/null || true
			TEARDOWN_PROBLEMS=1
		fi
		status=0
		wait "$pid" 2>/dev/null || status=$?
		if ((status == 0)); then
			say "vipgated exited cleanly (status 0)"
		else
			warn "vipgated exited with status $status"
			TEARDOWN_PROBLEMS=1
		fi
	else
		if ! stop_pid "$pid" 20; then
			warn "vipgated did not stop within 20s; it was killed with SIGKILL"
			TEARDOWN_PROBLEMS=1
		else
			say "vipgated stopped"
		fi
	fi
}

# Removes everything a demo run creates; safe to run when nothing is there.
demo_down() {
	local pid ifname f
	k8s_down
	pid=$(cat "$PIDFILE" 2>/dev/null || true)
	if [[ -n $pid ]] && is_our_daemon "$pid"; then
		stop_daemon "$pid"
	fi
	DAEMON_PID=""
	if [[ -d $VG_RIG_STATE_ROOT/$PREFIX || -e /run/netns/$CLIENT_NS || -e /run/netns/$BACKEND_NS ]]; then
		"$RIG" down --prefix "$PREFIX" || warn "rig down reported a problem"
	fi
	for ifname in "$CLIENT_IF" "$BACKEND_IF"; do
		if ip link show dev "$ifname" >/dev/null 2>&1; then
			say "removing leftover interface $ifname"
			ip link del dev "$ifname" 2>/dev/null || warn "could not remove $ifname"
		fi
	done
	if [[ -d /var/run/dpdk/$FILE_PREFIX ]]; then
		say "removing DPDK runtime directory /var/run/dpdk/$FILE_PREFIX"
		rm -rf "/var/run/dpdk/$FILE_PREFIX"
		rmdir /var/run/dpdk 2>/dev/null || true
	fi
	for f in /dev/hugepages/"$FILE_PREFIX"map_*; do
		[[ -e $f ]] || continue
		say "removing leftover hugepage file $f"
		rm -f "$f"
	done
	if [[ -S $SOCKET ]]; then
		say "removing $SOCKET"
		rm -f "$SOCKET"
	fi
	if [[ -d $STATE ]]; then
		say "removing $STATE"
		rm -rf "$STATE"
	fi
}

on_exit() {
	local rc=$?
	trap - EXIT INT TERM
	set +e
	stop_fg
	if ((KEEP_RUNNING)); then
		exit "$rc"
	fi
	if ((rc != 0 && rc != 130 && rc != 143)) && [[ -s $LOG ]]; then
		cp -f "$LOG" "$FAILED_LOG"
		printf '==> demo: last lines of the vipgated log (full log saved to %s):\n' "$FAILED_LOG" >&2
		tail -n 30 "$LOG" | sed 's/^/    /' >&2
	fi
	say "tearing down"
	demo_down
	if ((rc == 0 && TEARDOWN_PROBLEMS)); then
		rc=1
	fi
	if ((rc == 0)); then
		say "demo passed; everything is torn down"
	else
		printf '==> demo: FAILED (exit %s)\n' "$rc" >&2
	fi
	exit "$rc"
}

# One demo at a time: a second one would tear the first one down (same
# namespaces, interfaces and DPDK file prefix). The lock is held on fd 9 for
# the life of this script; long-lived children get 9>&- so that a kept demo
# does not hold it.
LOCK=$VG_ENV_DIR/demo.lock
mkdir -p "$VG_ENV_DIR"
exec 9>"$LOCK"
if ! flock -n 9; then
	die "another scripts/demo.sh is running on this machine (it holds $LOCK); wait for it to finish"
fi

if [[ $MODE = down ]]; then
	say "tearing down a kept demo"
	DAEMON_IS_CHILD=0
	demo_down
	say "done"
	exit "$TEARDOWN_PROBLEMS"
fi

# --- demo ----------------------------------------------------------------------

say "cleaning up leftovers of a previous demo run (if any)"
demo_down
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "step 1/8: machine setup (scripts/setup.sh)"
"$VG_SCRIPTS_DIR/setup.sh" </dev/null
load_hugepages_env
say "hugepages: VIPGATE_HUGEPAGES=$VIPGATE_HUGEPAGES${VIPGATE_HUGEPAGES_REASON:+ ($VIPGATE_HUGEPAGES_REASON)}"

PACKAGES=(-p vipgate-daemon -p vipgate-controlplane)
((K8S)) && PACKAGES+=(-p vipgate-k8s)
if ((BUILD)); then
	say "step 2/8: building (cargo build --release ${PACKAGES[*]})"
	add_cargo_to_path
	run_fg cargo build --release "${PACKAGES[@]}"
else
	say "step 2/8: not building (--no-build): using $VIPGATED and $VIPGATECTL"
fi
[[ -x $VIPGATED && -x $VIPGATECTL ]] || die "build finished but $VIPGATED or $VIPGATECTL is missing"
((K8S == 0)) || [[ -x $VIPGATE_K8S ]] || die "$VIPGATE_K8S is missing"

say "step 3/8: writing the demo configuration"
LCORES=$(python3 -c 'import os; c = sorted(os.sched_getaffinity(0)); print(",".join(map(str, c[:2])) if len(c) >= 2 else "")')
[[ -n $LCORES ]] || die "the demo needs 2 CPUs (one control-plane lcore, one worker); this process may use fewer"
HUGE=false
((VIPGATE_HUGEPAGES == 1)) && HUGE=true
mkdir -p "$STATE" "$(dirname -- "$SOCKET")"
backend_list() { # PORT
	local i
	for ((i = 1; i <= BACKENDS; i++)); do
		printf '\n  { address = "%s.%d", port = %d },' "$VG_BACKEND_NET_PREFIX" $((10 + i)) "$1"
	done
	printf '\n'
}
cat >"$CONF" <<EOF
# vipgate demo configuration, written by scripts/demo.sh.
[eal]
lcores = "$LCORES"            # first = main lcore (control plane); the rest are workers
hugepages = $HUGE          # false => --no-huge
memory_mb = 256
file_prefix = "$FILE_PREFIX"    # unique per instance; hugepage files are unlinked (--huge-unlink)

[dataplane]
idle_sleep_us = 20        # worker backs off when idle (good on small shared machines)

[api]
socket = "$SOCKET"

[state]
dir = "$STATE/state"   # the demo's own, removed with it

[[ports]]
name = "client"
device = "net_tap0,iface=$CLIENT_IF"
addresses = ["$VG_CLIENT_GW/24"]
kernel_interface = ""  # the exception path is off in the demo

[[ports]]
name = "backend"
device = "net_tap1,iface=$BACKEND_IF"
addresses = ["$VG_BACKEND_GW/24"]
kernel_interface = ""

EOF
if ((K8S)); then
	echo '# --k8s: no services here; vipgate-k8s pushes them through the API.' >>"$CONF"
else
	cat >>"$CONF" <<EOF

[[services]]
name = "web"
vip = "$VG_VIP"
port = 80
protocol = "tcp"
backends = [$(backend_list "$VG_HTTP_PORT")
]

[[services]]
name = "echo"
vip = "$VG_VIP"
port = $VG_UDP_PORT
protocol = "udp"
backends = [$(backend_list "$VG_UDP_PORT")
]
EOF
fi
say "configuration: $CONF (lcores $LCORES, hugepages $HUGE)"
sed 's/^/    /' "$CONF"
say "checking it: vipgated --config $CONF --check"
"$VIPGATED" --config "$CONF" --check </dev/null

say "step 4/8: starting vipgated (log: $LOG)"
setsid "$VIPGATED" --config "$CONF" </dev/null >"$LOG" 2>&1 9>&- &
DAEMON_PID=$!
DAEMON_IS_CHILD=1
echo "$DAEMON_PID" >"$PIDFILE"
say "vipgated pid $DAEMON_PID; waiting for its interfaces $CLIENT_IF and $BACKEND_IF"
t0=$(now_s)
deadline=$(($(date +%s) + 60))
while :; do
	pid_alive "$DAEMON_PID" || die "vipgated exited during start-up (see $LOG)"
	if ip -o link show dev "$CLIENT_IF" 2>/dev/null | grep -q '[<,]UP[,>]' &&
		ip -o link show dev "$BACKEND_IF" 2>/dev/null | grep -q '[<,]UP[,>]'; then
		break
	fi
	(($(date +%s) < deadline)) || die "vipgated did not bring up $CLIENT_IF and $BACKEND_IF within 60s (see $LOG)"
	sleep 0.2
done
say "interfaces are up after $(elapsed_s "$t0")s"

say "step 5/8: building the rig (scripts/rig.sh up)"
"$RIG" up --prefix "$PREFIX" --client-if "$CLIENT_IF" --backend-if "$BACKEND_IF" --backends "$BACKENDS" --wait 30 9>&-

say "waiting for the API: vipgatectl --socket $SOCKET health"
deadline=$(($(date +%s) + 30))
until "$VIPGATECTL" --socket "$SOCKET" health </dev/null >/dev/null 2>&1; do
	pid_alive "$DAEMON_PID" || die "vipgated exited (see $LOG)"
	(($(date +%s) < deadline)) || die "vipgatectl health did not succeed within 30s"
	sleep 0.5
done
say "vipgated is serving"
if ((K8S)); then
	k8s_demo
fi

BASE_URL=http://$VG_VIP
URL=$BASE_URL/
say "waiting for the VIP to answer (curl $URL from $CLIENT_NS)"
t0=$(now_s)
deadline=$(($(date +%s) + 20))
until ip netns exec "$CLIENT_NS" curl -s --fail --max-time 2 -o /dev/null "$URL" </dev/null; do
	pid_alive "$DAEMON_PID" || die "vipgated exited (see $LOG)"
	(($(date +%s) < deadline)) || die "the VIP did not answer within 20s"
	sleep 0.5
done
say "first answer after $(elapsed_s "$t0")s"

say "step 6/8: $REQUESTS HTTP requests: ip netns exec $CLIENT_NS curl -s --max-time 3 $URL (a new connection each)"
t0=$(now_s)
# One line per request: "ok <backend>" or "fail <curl's error>".
# shellcheck disable=SC2016 # the loop runs in its own shell, in the namespace
run_fg ip netns exec "$CLIENT_NS" bash -c '
	for ((i = 0; i < $1; i++)); do
		if body=$(curl -sS --fail --max-time 3 "$2" 2>&1); then
			echo "ok ${body#backend }"
		else
			echo "fail $(printf %s "$body" | tr "\n" " ")"
		fi
	done >"$3"' _ "$REQUESTS" "$URL" "$STATE/results"
RESULTS=$(<"$STATE/results")
took=$(elapsed_s "$t0")
ok=$(grep -c '^ok ' <<<"$RESULTS" || true)
failed=$(grep -c '^fail' <<<"$RESULTS" || true)
say "$REQUESTS requests in ${took}s: $ok answered, $failed failed"
DEMO_FAIL=0
printf '    %-10s %-13s %6s %7s\n' backend address answers share
while read -r name addr _; do
	n=$(grep -c "^ok $name\$" <<<"$RESULTS" || true)
	pct=$(awk -v n="$n" -v t="$REQUESTS" 'BEGIN { printf "%.1f%%", 100 * n / t }')
	bar=$(awk -v n="$n" -v t="$REQUESTS" 'BEGIN { w = int(40 * n / t + 0.5); s = ""; for (i = 0; i < w; i++) s = s "#"; print s }')
	printf '    %-10s %-13s %6d %7s  %s\n' "$name" "$addr" "$n" "$pct" "$bar"
	if ((n == 0)); then
		warn "$name got no request"
		DEMO_FAIL=1
	fi
done <"$VG_RIG_STATE_ROOT/$PREFIX/backends"
other=$(grep '^ok ' <<<"$RESULTS" | grep -vc '^ok backend-[0-9]*$' || true)
if ((other > 0)); then
	warn "$other answer(s) came from no known backend:"
	grep '^ok ' <<<"$RESULTS" | grep -v '^ok backend-[0-9]*$' | sort | uniq -c | head -n 5 | sed 's/^/    /' >&2
	DEMO_FAIL=1
fi
if ((failed > 0)); then
	warn "$failed request(s) failed; the errors were:"
	grep '^fail' <<<"$RESULTS" | sort | uniq -c | sort -rn | head -n 5 | sed 's/^/    /' >&2
	DEMO_FAIL=1
fi

say "step 7/8: one UDP request: ip netns exec $CLIENT_NS socat - UDP4:$VG_VIP:$VG_UDP_PORT"
REPLY_TEXT=""
for attempt in 1 2 3; do
	REPLY_TEXT=$(printf 'hello from the demo client\n' |
		ip netns exec "$CLIENT_NS" socat -t 2 -T 3 - "UDP4:$VG_VIP:$VG_UDP_PORT" 2>/dev/null || true)
	[[ -n $REPLY_TEXT ]] && break
	say "no UDP reply (attempt $attempt of 3)"
done
if [[ $REPLY_TEXT = backend-*" hello from the demo client" ]]; then
	say "UDP reply: $REPLY_TEXT"
else
	warn "no valid UDP reply (got: '${REPLY_TEXT}')"
	DEMO_FAIL=1
fi

say "step 8/8: gateway counters: vipgatectl --socket $SOCKET stats"
if ! "$VIPGATECTL" --socket "$SOCKET" stats </dev/null 2>&1 | sed 's/^/    /'; then
	warn "vipgatectl stats failed; trying --json"
	"$VIPGATECTL" --socket "$SOCKET" --json stats </dev/null 2>&1 | sed 's/^/    /' || true
fi

if ((DEMO_FAIL)); then
	die "the demo found problems (see the warnings above)"
fi
if ((K8S)); then
	k8s_finish
fi

if ((KEEP)); then
	KEEP_RUNNING=1
	cat <<EOF
==> demo: passed; everything is left running (--keep). Try:
    ip netns exec $CLIENT_NS curl -si $URL
    ip netns exec $CLIENT_NS curl -s $BASE_URL/whoami
    printf 'hi\\n' | ip netns exec $CLIENT_NS socat -t 2 - UDP4:$VG_VIP:$VG_UDP_PORT
    scripts/rig.sh exec --prefix $PREFIX client -- bash    (a shell in the client namespace)
    $VIPGATECTL --socket $SOCKET stats
    $VIPGATECTL --socket $SOCKET --json stats
    tail -f $LOG    (vipgated's log)
  Tear down with:
    scripts/demo.sh --down
EOF
fi
