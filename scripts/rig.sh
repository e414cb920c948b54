#!/usr/bin/env bash
# The test rig: a client namespace and a backend namespace around a running
# gateway, using the two net_tap interfaces the gateway created.
#
#   rig.sh up     --prefix P --client-if IF --backend-if IF
#                 [--backends N] [--wait SECONDS] [--http-port PORT] [--udp-port PORT]
#   rig.sh down   --prefix P
#   rig.sh exec   --prefix P client|backend -- CMD [ARGS...]
#   rig.sh status --prefix P
#
# up: creates the namespaces ${P}client and ${P}backend; waits (at most
#   --wait seconds, default 20) for the two interfaces to appear in the root
#   namespace and be up (the gateway creates them and brings them up when it
#   starts its ports), moves them in and configures them:
#
#     ${P}client   lo up; CLIENT_IF 198.18.0.2/24;
#                  route 198.18.100.0/24 via 198.18.0.1 (the gateway, VIPs)
#     ${P}backend  lo up; BACKEND_IF 198.18.1.11/24 ... 198.18.1.(10+N)/24;
#                  route 198.18.0.0/24 via 198.18.1.1 (nat mode: replies to
#                  the real client address go back through the gateway)
#
#   then starts N backends (scripts/backend.py, named backend-1..backend-N,
#   backend-i on 198.18.1.(10+i), HTTP on 8080, UDP on 5353) and returns
#   once every one answers HTTP and UDP. Running it again on a rig that is
#   up only repairs what is missing (dead backends, lost addresses).
# down: stops the backends and every other process inside the two
#   namespaces, deletes the namespaces and the state. Never fails when things
#   are already gone.
# exec: runs CMD inside ${P}client or ${P}backend (ip netns exec).
# status: prints the namespaces, addresses, routes and backends.
#
# State: /run/vipgate-rig/${P}/ (rig.env, backends, backend-i.pid,
# backend-i.log, and owner: $VIPGATE_TEST_RUN_ID when scripts/test.sh runs it).
set -euo pipefail

VG_TAG=rig
# shellcheck source=scripts/common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

BACKEND_PY=$VG_SCRIPTS_DIR/backend.py

usage() {
	sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

usage_error() {
	printf '==> rig: ERROR: %s\n' "$*" >&2
	printf 'usage: rig.sh up|down|exec|status --prefix P ... (rig.sh --help)\n' >&2
	exit 2
}

PREFIX=""
CLIENT_IF=""
BACKEND_IF=""
BACKENDS=3
WAIT_S=20
HTTP_PORT=$VG_HTTP_PORT
UDP_PORT=$VG_UDP_PORT
ROLE=""
CMD=()

set_opt() {
	case $1 in
	--prefix) PREFIX=$2 ;;
	--client-if) CLIENT_IF=$2 ;;
	--backend-if) BACKEND_IF=$2 ;;
	--backends) BACKENDS=$2 ;;
	--wait) WAIT_S=$2 ;;
	--http-port) HTTP_PORT=$2 ;;
	--udp-port) UDP_PORT=$2 ;;
	esac
}

parse_args() {
	local sub=$1
	shift
	while (($#)); do
		case $1 in
		--prefix | --client-if | --backend-if | --backends | --wait | --http-port | --udp-port)
			(($# >= 2)) || usage_error "$1 needs a value"
			set_opt "$1" "$2"
			shift 2
			;;
		--prefix=* | --client-if=* | --backend-if=* | --backends=* | --wait=* | --http-port=* | --udp-port=*)
			set_opt "${1%%=*}" "${1#*=}"
			shift
			;;
		client | backend)
			[[ $sub = exec && -z $ROLE ]] || usage_error "unexpected argument: $1"
			ROLE=$1 && shift
			;;
		--)
			[[ $sub = exec ]] || usage_error "unexpected argument: --"
			shift
			CMD=("$@")
			break
			;;
		-h | --help) usage && exit 0 ;;
		*) usage_error "unknown argument for '$sub': $1" ;;
		esac
	done
	[[ -n $PREFIX ]] || usage_error "--prefix is required"
	[[ $PREFIX =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,30}$ ]] ||
		usage_error "--prefix must be 1-31 characters of [A-Za-z0-9_.-]: '$PREFIX'"
	CLIENT_NS=${PREFIX}client
	BACKEND_NS=${PREFIX}backend
	STATE=$VG_RIG_STATE_ROOT/$PREFIX
	case $sub in
	up)
		[[ -n $CLIENT_IF && -n $BACKEND_IF ]] || usage_error "up needs --client-if and --backend-if"
		local ifname
		for ifname in "$CLIENT_IF" "$BACKEND_IF"; do
			[[ $ifname =~ ^[A-Za-z0-9_.-]{1,15}$ ]] || usage_error "bad interface name: '$ifname'"
		done
		[[ $CLIENT_IF != "$BACKEND_IF" ]] || usage_error "--client-if and --backend-if must differ"
		if ! [[ $BACKENDS =~ ^[0-9]+$ ]] || ((BACKENDS < 1 || BACKENDS > 200)); then
			usage_error "--backends must be 1..200"
		fi
		[[ $WAIT_S =~ ^[0-9]+$ ]] || usage_error "--wait must be a whole number of seconds"
		[[ $HTTP_PORT =~ ^[0-9]+$ && $UDP_PORT =~ ^[0-9]+$ ]] || usage_error "ports must be numbers"
		;;
	exec)
		[[ -n $ROLE ]] || usage_error "exec needs 'client' or 'backend'"
		((${#CMD[@]})) || usage_error "exec needs -- CMD [ARGS...]"
		;;
	esac
}

ns_exists() { [[ -e /run/netns/$1 ]]; }
ns_of() { if [[ $1 = client ]]; then echo "$CLIENT_NS"; else echo "$BACKEND_NS"; fi; }
backend_addr() { echo "$VG_BACKEND_NET_PREFIX.$((10 + $1))"; }

ensure_ns() {
	local ns=$1
	if ns_exists "$ns"; then
		say "namespace $ns exists"
	else
		say "creating namespace $ns"
		ip netns add "$ns"
	fi
	ip -n "$ns" link set lo up
}

# if_state IFNAME NS: prints "root-up", "root-down", "ns" or "absent".
if_state() {
	local ifname=$1 ns=$2 flags
	if ip -n "$ns" link show dev "$ifname" >/dev/null 2>&1; then
		echo ns
	elif flags=$(ip -o link show dev "$ifname" 2>/dev/null); then
		# "2: vgd-c: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu ..."
		if [[ $flags =~ \<([A-Z_,]*)\> && ,${BASH_REMATCH[1]}, = *,UP,* ]]; then
			echo root-up
		else
			echo root-down
		fi
	else
		echo absent
	fi
}

# Waits for both interfaces, then moves each into its namespace. An interface
# is moved only once it is up: the net_tap PMD brings it up when the gateway
# starts the port, and its ioctls by name fail once it is in another namespace.
attach_interfaces() {
	local start deadline st_c st_b last_note=0 now
	start=$(date +%s)
	deadline=$((start + WAIT_S))
	say "waiting up to ${WAIT_S}s for $CLIENT_IF and $BACKEND_IF (created by the gateway) to be up"
	while :; do
		st_c=$(if_state "$CLIENT_IF" "$CLIENT_NS")
		st_b=$(if_state "$BACKEND_IF" "$BACKEND_NS")
		if [[ $st_c = root-up || $st_c = ns ]] && [[ $st_b = root-up || $st_b = ns ]]; then
			break
		fi
		now=$(date +%s)
		if ((now >= deadline)); then
			die "timed out after ${WAIT_S}s waiting for the interfaces ($CLIENT_IF: $st_c, $BACKEND_IF: $st_b). Is the gateway running with these net_tap interfaces? Clean up with: $0 down --prefix $PREFIX"
		fi
		if ((now - last_note >= 5)); then
			((last_note == 0)) || say "still waiting ($CLIENT_IF: $st_c, $BACKEND_IF: $st_b)"
			last_note=$now
		fi
		sleep 0.2
	done
	move_if "$CLIENT_IF" "$CLIENT_NS" "$st_c"
	move_if "$BACKEND_IF" "$BACKEND_NS" "$st_b"
}

move_if() {
	local ifname=$1 ns=$2 st=$3
	if [[ $st = ns ]]; then
		say "$ifname is already in $ns"
	else
		say "moving $ifname into $ns"
		ip link set dev "$ifname" netns "$ns"
	fi
}

configure_client() {
	say "$CLIENT_NS: $CLIENT_IF $VG_CLIENT_ADDR/24, route $VG_VIP_NET via $VG_CLIENT_GW"
	ip -n "$CLIENT_NS" addr replace "$VG_CLIENT_ADDR/24" dev "$CLIENT_IF"
	ip -n "$CLIENT_NS" link set "$CLIENT_IF" up
	ip -n "$CLIENT_NS" route replace "$VG_VIP_NET" via "$VG_CLIENT_GW" dev "$CLIENT_IF"
}

configure_backend() {
	local i addrs=()
	for ((i = 1; i <= BACKENDS; i++)); do
		addrs+=("$(backend_addr "$i")")
		ip -n "$BACKEND_NS" addr replace "$(backend_addr "$i")/24" dev "$BACKEND_IF"
	done
	say "$BACKEND_NS: $BACKEND_IF ${addrs[*]} (/24), route $VG_CLIENT_NET via $VG_BACKEND_GW"
	ip -n "$BACKEND_NS" link set "$BACKEND_IF" up
	ip -n "$BACKEND_NS" route replace "$VG_CLIENT_NET" via "$VG_BACKEND_GW" dev "$BACKEND_IF"
}

# Is PID one of our backends (and not a recycled pid)?
is_backend_pid() {
	local pid=$1 cmdline
	pid_alive "$pid" || return 1
	cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
	[[ $cmdline = *"backend.py --name "* ]]
}

start_backends() {
	local i name addr pidf pid
	: >"$STATE/backends.tmp"
	for ((i = 1; i <= BACKENDS; i++)); do
		name=backend-$i
		addr=$(backend_addr "$i")
		pidf=$STATE/$name.pid
		printf '%s %s %s %s\n' "$name" "$addr" "$HTTP_PORT" "$UDP_PORT" >>"$STATE/backends.tmp"
		pid=$(cat "$pidf" 2>/dev/null || true)
		if [[ -n $pid ]] && is_backend_pid "$pid"; then
			say "$name already running (pid $pid) on $addr"
			continue
		fi
		rm -f "$pidf"
		say "starting $name on $addr (http $HTTP_PORT, udp $UDP_PORT), log $STATE/$name.log"
		setsid ip netns exec "$BACKEND_NS" python3 "$BACKEND_PY" --name "$name" --bind "$addr" \
			--http-port "$HTTP_PORT" --udp-port "$UDP_PORT" --pid-file "$pidf" \
			</dev/null >>"$STATE/$name.log" 2>&1 &
		echo "$!" >"$pidf.launch"
	done
	mv -f "$STATE/backends.tmp" "$STATE/backends"
}

wait_backends() {
	local deadline name addr hp up pending body reply i
	deadline=$(($(date +%s) + WAIT_S))
	say "waiting for $BACKENDS backend(s) to answer HTTP and UDP"
	while :; do
		pending=()
		while read -r name addr hp up; do
			body=$(ip netns exec "$BACKEND_NS" curl -s --max-time 1 "http://$addr:$hp/" 2>/dev/null || true)
			reply=""
			if [[ $body = "backend $name" ]]; then
				reply=$(printf 'ping' | ip netns exec "$BACKEND_NS" socat -t 1 -T 1 - "UDP4:$addr:$up" 2>/dev/null || true)
			fi
			[[ $reply = "$name ping" ]] || pending+=("$name")
		done <"$STATE/backends"
		((${#pending[@]} == 0)) && break
		for ((i = 1; i <= BACKENDS; i++)); do
			if [[ -f $STATE/backend-$i.pid.launch ]] && ! pid_alive "$(cat "$STATE/backend-$i.pid.launch")" && [[ ! -f $STATE/backend-$i.pid ]]; then
				tail -n 20 "$STATE/backend-$i.log" >&2 || true
				die "backend-$i exited at start (log above: $STATE/backend-$i.log)"
			fi
		done
		if (($(date +%s) >= deadline)); then
			die "timed out after ${WAIT_S}s waiting for: ${pending[*]} (logs in $STATE)"
		fi
		sleep 0.2
	done
	rm -f "$STATE"/*.pid.launch
	say "all $BACKENDS backend(s) answer HTTP and UDP"
}

cmd_up() {
	local want
	require_root
	for tool in ip curl socat python3 setsid; do
		command -v "$tool" >/dev/null || die "$tool not found (run scripts/setup.sh)"
	done
	mkdir -p "$STATE"
	want=$(printf 'PREFIX=%s\nCLIENT_IF=%s\nBACKEND_IF=%s\nBACKENDS=%s\nHTTP_PORT=%s\nUDP_PORT=%s\n' \
		"$PREFIX" "$CLIENT_IF" "$BACKEND_IF" "$BACKENDS" "$HTTP_PORT" "$UDP_PORT")
	if [[ -f $STATE/rig.env ]]; then
		if [[ $(<"$STATE/rig.env") != "$want" ]]; then
			die "rig '$PREFIX' is already up with other settings ($STATE/rig.env); run: $0 down --prefix $PREFIX"
		fi
		say "rig '$PREFIX' already set up; checking every part"
	else
		say "setting up rig '$PREFIX' (state in $STATE)"
		printf '%s\n' "$want" >"$STATE/rig.env"
	fi
	if [[ -n ${VIPGATE_TEST_RUN_ID:-} ]]; then
		# Lets scripts/test.sh find and remove the rigs its tests leave behind.
		printf '%s\n' "$VIPGATE_TEST_RUN_ID" >"$STATE/owner"
	fi
	ensure_ns "$CLIENT_NS"
	ensure_ns "$BACKEND_NS"
	attach_interfaces
	configure_client
	configure_backend
	start_backends
	wait_backends
	say "rig '$PREFIX' is up: client in $CLIENT_NS ($VG_CLIENT_ADDR), $BACKENDS backend(s) in $BACKEND_NS"
}

cmd_down() {
	local f pid ns pids=() left
	require_root
	if [[ -d $STATE ]]; then
		for f in "$STATE"/*.pid "$STATE"/*.pid.launch; do
			[[ -f $f ]] || continue
			pid=$(cat "$f" 2>/dev/null || true)
			if [[ -n $pid ]] && is_backend_pid "$pid"; then
				say "stopping $(basename "${f%%.pid*}") (pid $pid)"
				pids+=("$pid")
			fi
		done
	fi
	for ns in "$CLIENT_NS" "$BACKEND_NS"; do
		ns_exists "$ns" || continue
		for pid in $(ip netns pids "$ns" 2>/dev/null || true); do
			[[ " ${pids[*]} " = *" $pid "* ]] && continue
			say "stopping pid $pid, still running in $ns: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-100)"
			pids+=("$pid")
		done
	done
	stop_pids 5 "${pids[@]}"
	for ns in "$CLIENT_NS" "$BACKEND_NS"; do
		ns_exists "$ns" || continue
		say "deleting namespace $ns"
		ip netns del "$ns" 2>/dev/null || warn "could not delete namespace $ns"
	done
	if [[ -d $STATE ]]; then
		say "removing $STATE"
		rm -rf "$STATE"
	fi
	left=""
	for ns in "$CLIENT_NS" "$BACKEND_NS"; do
		ns_exists "$ns" && left+=" $ns"
	done
	[[ -z $left ]] || warn "namespaces still present:$left"
	say "rig '$PREFIX' is down"
}

cmd_exec() {
	local ns
	ns=$(ns_of "$ROLE")
	ns_exists "$ns" || die "namespace $ns does not exist (is the rig up? $0 up --prefix $PREFIX ...)"
	say "exec in $ns: ${CMD[*]}" >&2
	exec ip netns exec "$ns" "${CMD[@]}"
}

cmd_status() {
	local ns name addr hp up pid st
	for ns in "$CLIENT_NS" "$BACKEND_NS"; do
		if ns_exists "$ns"; then
			say "namespace $ns:"
			ip -n "$ns" -br addr show | sed 's/^/    /'
			ip -n "$ns" route show | sed 's/^/    route /'
		else
			say "namespace $ns: absent"
		fi
	done
	if [[ -f $STATE/backends ]]; then
		while read -r name addr hp up; do
			pid=$(cat "$STATE/$name.pid" 2>/dev/null || true)
			if [[ -n $pid ]] && is_backend_pid "$pid"; then st="running (pid $pid)"; else st="NOT running"; fi
			say "$name $addr http $hp udp $up: $st"
		done <"$STATE/backends"
	else
		say "no state in $STATE"
	fi
}

(($#)) || usage_error "missing subcommand"
SUB=$1
shift
case $SUB in
up | down | exec | status) parse_args "$SUB" "$@" ;;
-h | --help | help) usage && exit 0 ;;
*) usage_error "unknown subcommand: $SUB" ;;
esac
"cmd_$SUB"
