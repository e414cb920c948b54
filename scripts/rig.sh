#!/usr/bin/env bash
# The test rig: a client namespace and a backend side around a running
# gateway, using the two net_tap interfaces the gateway created.
#
#   rig.sh up     --prefix P --client-if IF --backend-if IF
#                 [--mode nat|fullnat|dsr] [--dsr-decap kernel|userspace]
#                 [--backends N] [--wait SECONDS] [--http-port PORT] [--udp-port PORT]
#                 [--gateway-ns] [--no-vip-route] [--only-backend I]
#   rig.sh down   --prefix P
#   rig.sh exec   --prefix P client|backend|b<i>|gateway -- CMD [ARGS...]
#   rig.sh status --prefix P
#
# up: creates the namespaces ${P}client and ${P}backend; waits (at most
#   --wait seconds, default 20) for the two interfaces to appear in the root
#   namespace and be up (the gateway creates them and brings them up when it
#   starts its ports), moves them in and configures them for --mode (the
#   gateway's services must use the same mode; default nat).
#   --gateway-ns: the gateway runs in the namespace ${P}gw instead (the
#   caller created it and started the gateway inside, e.g. with `ip netns
#   exec ${P}gw vipgated ...`), so its own kernel side (the kernel
#   interfaces of its exception path, with the ports' addresses) is apart
#   from the host's and from other rigs'; the interfaces are awaited and
#   taken from there, and `down` deletes ${P}gw too (after stopping what
#   still runs in it).
#
#   nat, fullnat:
#     ${P}client   lo up; CLIENT_IF 198.18.0.2/24;
#                  route 198.18.100.0/24 via 198.18.0.1 (the gateway, VIPs;
#                  none with --no-vip-route)
#     ${P}backend  lo up; BACKEND_IF 198.18.1.11/24 ... 198.18.1.(10+N)/24;
#                  nat: route 198.18.0.0/24 via 198.18.1.1 (replies to the
#                  real client address go back through the gateway);
#                  fullnat: NO route to 198.18.0.0/24 (the backends answer
#                  the gateway's source pool address, on their own subnet)
#     backend-i listens on 198.18.1.(10+i) in ${P}backend.
#
#   dsr (direct server return: the gateway sends each client packet to the
#   backend in IPIP; the backend answers the client directly):
#     ${P}backend  the backend LAN: bridge br0 with BACKEND_IF (no address),
#                  one veth to each backend namespace and one to the client
#     ${P}b<i>     backend-i: eth0 198.18.1.(10+i)/24 on br0; the VIP
#                  198.18.100.1/32 on lo; route 198.18.0.0/24 via
#                  198.18.1.200 (the client's leg, not the gateway); the
#                  DSR backend set-up: net.ipv4.conf.{all,default,tunl0}.
#                  rp_filter=0, net.ipv4.conf.all.arp_ignore=1,
#                  net.ipv4.conf.all.arp_announce=2, and the decapsulator:
#                    --dsr-decap kernel (default): the kernel's ipip
#                      fallback device tunl0, brought up (`modprobe ipip`
#                      first in the root namespace; up fails if the kernel
#                      has no IPIP, or creates no tunl0 in other namespaces,
#                      net.core.fb_tunnels_only_for_init_net)
#                    --dsr-decap userspace: for kernels without IPIP
#                      (CONFIG_NET_IPIP): a TUN device vgdecap (same
#                      rp_filter=0) into which backend.py --ipip-decap writes
#                      the inner packets it takes from a raw IPIP socket
#                  backend-i listens on its address and on the VIP, so that
#                  UDP replies leave from the VIP.
#     ${P}client   as above, plus a leg lan0 198.18.1.200/24 on br0 where
#                  the replies arrive, and net.ipv4.conf.{all,default,lan0}.
#                  rp_filter=0 (replies from the VIP arrive on lan0, while
#                  the route to the VIP is via the gateway on CLIENT_IF)
#     The backend LAN's links have an MTU of 1520, so that a full-size
#     client packet still fits on the LAN once the gateway has added its
#     20-byte IPIP header (whether the gateway can send it is up to the MTU
#     of the gateway's own port).
#
#   --no-vip-route: the client gets no route to $VG_VIP_NET (only its
#   connected 198.18.0.0/24), so that it reaches a VIP only through a route
#   it learns, say over BGP from the gateway's routing daemon through the
#   exception path (tests/routing.rs).
#
#   then starts N backends (scripts/backend.py, named backend-1..backend-N,
#   HTTP on 8080, UDP on 5353), waits until every one answers HTTP and UDP
#   (in dsr mode on its address and on the VIP), and announces each backend
#   address to the gateway with an ARP request for 198.18.1.1 (a gateway
#   learns the sender of a request for its address, RFC 826; without it the
#   first packet to a backend could arrive before the gateway has resolved
#   it, and a gateway that drops while it resolves would lose it).
#   Running it again on a rig that is up only repairs what is missing (dead
#   backends, lost addresses); a second up with other settings (mode
#   included) is refused. With --only-backend I, such a repair restarts
#   backend-I alone (if it is not running) and waits for it only; the
#   other backends stay as they are, running or not.
# down: stops the backends and every other process inside the rig's
#   namespaces, deletes the namespaces (with them the bridge, the veths and
#   the taps) and the state. Never fails when things are already gone.
# exec: runs CMD inside ${P}client, ${P}backend (in dsr mode: the LAN, with
#   no address of its own), ${P}b<i> (dsr mode: backend-i) or ${P}gw
#   (gateway: the gateway's kernel side, with --gateway-ns).
# status: prints the namespaces, addresses, routes and backends.
#
# State: /run/vipgate-rig/${P}/ (rig.env, backends, backend-i.pid,
# backend-i.log, and owner: $VIPGATE_TEST_RUN_ID when scripts/test.sh runs it).
set -euo pipefail

VG_TAG=rig
# shellcheck source=scripts/common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

BACKEND_PY=$VG_SCRIPTS_DIR/backend.py
# Names inside the rig's namespaces (so they never clash between rigs).
LAN_BRIDGE=br0
LAN_MTU=1520
CLIENT_LAN_IF=lan0    # in ${P}client
CLIENT_LAN_PEER=vclient # in ${P}backend, on the bridge
BACKEND_LAN_IF=eth0   # in ${P}b<i>; its peer in ${P}backend is vb<i>
DECAP_TUN=vgdecap     # in ${P}b<i> with --dsr-decap userspace

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
MODE=nat
DSR_DECAP=""
VIP_ROUTE=1
ONLY_BACKEND=""
GATEWAY_IN_NS=0
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
	--mode) MODE=$2 ;;
	--dsr-decap) DSR_DECAP=$2 ;;
	--only-backend) ONLY_BACKEND=$2 ;;
	esac
}

parse_args() {
	local sub=$1
	shift
	while (($#)); do
		case $1 in
		--prefix | --client-if | --backend-if | --backends | --wait | --http-port | --udp-port | --mode | --dsr-decap | --only-backend)
			(($# >= 2)) || usage_error "$1 needs a value"
			set_opt "$1" "$2"
			shift 2
			;;
		--prefix=* | --client-if=* | --backend-if=* | --backends=* | --wait=* | --http-port=* | --udp-port=* | --mode=* | --dsr-decap=* | --only-backend=*)
			set_opt "${1%%=*}" "${1#*=}"
			shift
			;;
		client | backend | b[0-9]*)
			[[ $sub = exec && -z $ROLE ]] || usage_error "unexpected argument: $1"
			[[ $1 =~ ^(client|backend|b[1-9][0-9]*)$ ]] || usage_error "exec: '$1' is not client, backend or b<i> (i from 1)"
			ROLE=$1 && shift
			;;
		--gateway-ns)
			[[ $sub = up ]] || usage_error "--gateway-ns is an option of up"
			GATEWAY_IN_NS=1 && shift
			;;
		--no-vip-route)
			[[ $sub = up ]] || usage_error "--no-vip-route is an option of up"
			VIP_ROUTE=0 && shift
			;;
		gateway)
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
	GATEWAY_NS=${PREFIX}gw
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
		if [[ -n $ONLY_BACKEND ]] && { ! [[ $ONLY_BACKEND =~ ^[1-9][0-9]*$ ]] || ((ONLY_BACKEND > BACKENDS)); }; then
			usage_error "--only-backend must be from 1 to --backends ($BACKENDS): '$ONLY_BACKEND'"
		fi
		[[ $HTTP_PORT =~ ^[0-9]+$ && $UDP_PORT =~ ^[0-9]+$ ]] || usage_error "ports must be numbers"
		case $MODE in
		nat | fullnat | dsr) ;;
		*) usage_error "--mode must be nat, fullnat or dsr: '$MODE'" ;;
		esac
		if [[ $MODE = dsr ]]; then
			DSR_DECAP=${DSR_DECAP:-kernel}
			[[ $DSR_DECAP = kernel || $DSR_DECAP = userspace ]] ||
				usage_error "--dsr-decap must be kernel or userspace: '$DSR_DECAP'"
		elif [[ -n $DSR_DECAP ]]; then
			usage_error "--dsr-decap is only used with --mode dsr"
		fi
		;;
	exec)
		[[ -n $ROLE ]] || usage_error "exec needs 'client', 'backend', 'b<i>' or 'gateway'"
		((${#CMD[@]})) || usage_error "exec needs -- CMD [ARGS...]"
		;;
	esac
}

ns_exists() { [[ -e /run/netns/$1 ]]; }
ns_of() {
	case $1 in
	client) echo "$CLIENT_NS" ;;
	backend) echo "$BACKEND_NS" ;;
	gateway) echo "$GATEWAY_NS" ;;
	*) echo "$PREFIX$1" ;; # b<i>
	esac
}
backend_addr() { echo "$VG_BACKEND_NET_PREFIX.$((10 + $1))"; }

# The namespace backend i runs in.
backend_ns() { if [[ $MODE = dsr ]]; then echo "${PREFIX}b$1"; else echo "$BACKEND_NS"; fi; }

# Every namespace of this rig that exists: ${P}b<i> (dsr backends), then
# ${P}backend and ${P}client. Matched exactly, so that another rig's
# namespaces (say, those of prefix "${P}b1") are never taken for ours.
rig_namespaces() {
	local f n rest
	for f in /run/netns/"$PREFIX"b*; do
		[[ -e $f ]] || continue
		n=${f##*/}
		rest=${n#"$PREFIX"b}
		[[ $rest =~ ^[1-9][0-9]*$ ]] && echo "$n"
	done
	# The gateway's last: what runs in it stops with the others, and it
	# is deleted once the interfaces it lent are gone with theirs.
	for n in "$BACKEND_NS" "$CLIENT_NS" "$GATEWAY_NS"; do
		ns_exists "$n" && echo "$n"
	done
	return 0
}

# `ip` in the namespace the gateway runs in (the root one by default).
gw_ip() {
	if ((GATEWAY_IN_NS)); then ip -n "$GATEWAY_NS" "$@"; else ip "$@"; fi
}

# ns_sysctl NS KEY=VALUE...: sets sysctls inside NS.
ns_sysctl() {
	local ns=$1
	shift
	ip netns exec "$ns" sysctl -q -w "$@" >/dev/null
}

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
	elif flags=$(gw_ip -o link show dev "$ifname" 2>/dev/null); then
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
		gw_ip link set dev "$ifname" netns "$ns"
	fi
}

configure_client() {
	ip -n "$CLIENT_NS" addr replace "$VG_CLIENT_ADDR/24" dev "$CLIENT_IF"
	ip -n "$CLIENT_NS" link set "$CLIENT_IF" up
	if ((VIP_ROUTE)); then
		say "$CLIENT_NS: $CLIENT_IF $VG_CLIENT_ADDR/24, route $VG_VIP_NET via $VG_CLIENT_GW"
		ip -n "$CLIENT_NS" route replace "$VG_VIP_NET" via "$VG_CLIENT_GW" dev "$CLIENT_IF"
	else
		say "$CLIENT_NS: $CLIENT_IF $VG_CLIENT_ADDR/24, no route to $VG_VIP_NET (--no-vip-route: it is to be learned)"
	fi
}

configure_backend() {
	local i addrs=()
	for ((i = 1; i <= BACKENDS; i++)); do
		addrs+=("$(backend_addr "$i")")
		ip -n "$BACKEND_NS" addr replace "$(backend_addr "$i")/24" dev "$BACKEND_IF"
	done
	ip -n "$BACKEND_NS" link set "$BACKEND_IF" up
	if [[ $MODE = fullnat ]]; then
		say "$BACKEND_NS: $BACKEND_IF ${addrs[*]} (/24), no route to $VG_CLIENT_NET (fullnat needs none)"
		if [[ -n $(ip -n "$BACKEND_NS" route show "$VG_CLIENT_NET") ]]; then
			die "$BACKEND_NS has a route to $VG_CLIENT_NET, which fullnat mode must do without: $(ip -n "$BACKEND_NS" route show "$VG_CLIENT_NET")"
		fi
	else
		say "$BACKEND_NS: $BACKEND_IF ${addrs[*]} (/24), route $VG_CLIENT_NET via $VG_BACKEND_GW"
		ip -n "$BACKEND_NS" route replace "$VG_CLIENT_NET" via "$VG_BACKEND_GW" dev "$BACKEND_IF"
	fi
}

# dsr, --dsr-decap kernel: the ipip module must be there before the backend
# namespaces are created (each new namespace then gets its tunl0).
require_ipip() {
	if [[ ! -d /sys/module/ipip ]] && ! ip link show tunl0 >/dev/null 2>&1; then
		[[ -e /proc/modules ]] ||
			die "this kernel has no IPIP (ipip is not built in) and cannot load modules (no /proc/modules): DSR backends cannot decapsulate with tunl0 here; use --dsr-decap userspace (backend.py decapsulates instead of the kernel)"
		command -v modprobe >/dev/null ||
			die "the kernel's IPIP support (ipip) is not loaded and modprobe is not installed (apt-get install kmod); DSR backends need it to decapsulate. On a kernel without IPIP (CONFIG_NET_IPIP) use --dsr-decap userspace"
		say "modprobe ipip (the DSR backends decapsulate with its tunl0)"
		modprobe ipip ||
			die "modprobe ipip failed: DSR backends cannot decapsulate. On a kernel without IPIP (CONFIG_NET_IPIP) use --dsr-decap userspace"
	fi
	[[ -d /sys/module/ipip ]] || ip link show tunl0 >/dev/null 2>&1 ||
		die "ipip is still missing after modprobe (no /sys/module/ipip, no tunl0)"
}

# The bridge of the backend LAN, with the gateway's backend interface on it.
configure_lan() {
	if ip -n "$BACKEND_NS" link show dev "$LAN_BRIDGE" >/dev/null 2>&1; then
		say "$BACKEND_NS: bridge $LAN_BRIDGE exists"
	else
		say "$BACKEND_NS: creating bridge $LAN_BRIDGE (the backend LAN, MTU $LAN_MTU)"
		ip -n "$BACKEND_NS" link add "$LAN_BRIDGE" mtu "$LAN_MTU" type bridge
	fi
	if ! ip -n "$BACKEND_NS" -o link show dev "$BACKEND_IF" | grep -q " master $LAN_BRIDGE "; then
		# net_tap gives the kernel side of the tap the DPDK port's MAC. On a
		# bridge, a port's own MAC is the bridge's: frames to the gateway
		# would stay in the bridge instead of going out through the tap. So
		# the kernel side gets a MAC of its own (as a VM's tap does).
		local mac
		mac=02$(od -An -N5 -tx1 /dev/urandom | tr ' ' ':' | tr -d '\n')
		say "$BACKEND_NS: $BACKEND_IF gets kernel-side MAC $mac (the gateway keeps its own)"
		ip -n "$BACKEND_NS" link set "$BACKEND_IF" address "$mac"
	fi
	say "$BACKEND_NS: $BACKEND_IF (the gateway's backend port) on $LAN_BRIDGE, no address"
	ip -n "$BACKEND_NS" link set "$BACKEND_IF" mtu "$LAN_MTU"
	ip -n "$BACKEND_NS" link set "$BACKEND_IF" master "$LAN_BRIDGE"
	ip -n "$BACKEND_NS" link set "$BACKEND_IF" up
	ip -n "$BACKEND_NS" link set "$LAN_BRIDGE" up
}

# lan_veth NS IFNAME PEER: a veth pair from the LAN's bridge (PEER, in
# ${P}backend) to IFNAME in NS, both ends up, MTU of the LAN.
lan_veth() {
	local ns=$1 ifname=$2 peer=$3
	if ip -n "$BACKEND_NS" link show dev "$peer" >/dev/null 2>&1 && ip -n "$ns" link show dev "$ifname" >/dev/null 2>&1; then
		say "veth $BACKEND_NS/$peer <-> $ns/$ifname exists"
	else
		# Half a pair cannot be (a veth dies with its peer); a name taken by
		# something else is reported by ip.
		say "creating veth $BACKEND_NS/$peer <-> $ns/$ifname"
		ip -n "$BACKEND_NS" link add "$peer" mtu "$LAN_MTU" type veth peer name "$ifname" netns "$ns" mtu "$LAN_MTU"
	fi
	ip -n "$BACKEND_NS" link set "$peer" master "$LAN_BRIDGE"
	ip -n "$BACKEND_NS" link set "$peer" up
	ip -n "$ns" link set "$ifname" up
}

configure_client_lan() {
	say "$CLIENT_NS: leg $CLIENT_LAN_IF $VG_CLIENT_LAN_ADDR/24 in the backend LAN (DSR replies arrive there), rp_filter=0"
	lan_veth "$CLIENT_NS" "$CLIENT_LAN_IF" "$CLIENT_LAN_PEER"
	ip -n "$CLIENT_NS" addr replace "$VG_CLIENT_LAN_ADDR/24" dev "$CLIENT_LAN_IF"
	ns_sysctl "$CLIENT_NS" net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
		"net.ipv4.conf.$CLIENT_LAN_IF.rp_filter=0"
}

# Backend i of a dsr rig: its namespace on the LAN, with the DSR backend
# set-up.
configure_dsr_backend() {
	local i=$1 ns addr decap_if
	ns=$(backend_ns "$i")
	addr=$(backend_addr "$i")
	ensure_ns "$ns"
	# Before the veth exists, so that it is created with default's value.
	say "$ns: sysctls rp_filter=0 (all, default), arp_ignore=1, arp_announce=2 (all)"
	ns_sysctl "$ns" net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
		net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2
	lan_veth "$ns" "$BACKEND_LAN_IF" "vb$i"
	say "$ns: $BACKEND_LAN_IF $addr/24, VIP $VG_VIP/32 on lo, route $VG_CLIENT_NET via $VG_CLIENT_LAN_ADDR"
	ip -n "$ns" addr replace "$addr/24" dev "$BACKEND_LAN_IF"
	ip -n "$ns" addr replace "$VG_VIP/32" dev lo
	ip -n "$ns" route replace "$VG_CLIENT_NET" via "$VG_CLIENT_LAN_ADDR" dev "$BACKEND_LAN_IF"
	if [[ $DSR_DECAP = kernel ]]; then
		decap_if=tunl0
		ip -n "$ns" link show dev tunl0 >/dev/null 2>&1 ||
			die "$ns has no tunl0 although ipip is loaded (is net.core.fb_tunnels_only_for_init_net set? it is $(sysctl -n net.core.fb_tunnels_only_for_init_net 2>/dev/null || echo unknown))"
		say "$ns: ip link set tunl0 up (the kernel decapsulates IPIP)"
	else
		decap_if=$DECAP_TUN
		if ip -n "$ns" link show dev "$DECAP_TUN" >/dev/null 2>&1; then
			say "$ns: TUN device $DECAP_TUN exists (backend.py decapsulates IPIP into it)"
		else
			say "$ns: creating TUN device $DECAP_TUN (backend.py decapsulates IPIP into it; no kernel IPIP)"
			ip -n "$ns" tuntap add dev "$DECAP_TUN" mode tun
		fi
	fi
	ip -n "$ns" link set "$decap_if" up
	say "$ns: net.ipv4.conf.$decap_if.rp_filter=0"
	ns_sysctl "$ns" "net.ipv4.conf.$decap_if.rp_filter=0"
}

# Is PID one of our backends (and not a recycled pid)?
is_backend_pid() {
	local pid=$1 cmdline
	pid_alive "$pid" || return 1
	cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
	[[ $cmdline = *"backend.py --name "* ]]
}

start_backends() {
	local i name addr ns pidf pid binds decap
	: >"$STATE/backends.tmp"
	for ((i = 1; i <= BACKENDS; i++)); do
		name=backend-$i
		addr=$(backend_addr "$i")
		ns=$(backend_ns "$i")
		pidf=$STATE/$name.pid
		printf '%s %s %s %s %s\n' "$name" "$addr" "$HTTP_PORT" "$UDP_PORT" "$ns" >>"$STATE/backends.tmp"
		if [[ -n $ONLY_BACKEND && $i != "$ONLY_BACKEND" ]]; then
			continue
		fi
		pid=$(cat "$pidf" 2>/dev/null || true)
		if [[ -n $pid ]] && is_backend_pid "$pid"; then
			say "$name already running (pid $pid) on $addr in $ns"
			continue
		fi
		rm -f "$pidf"
		binds=(--bind "$addr")
		decap=()
		if [[ $MODE = dsr ]]; then
			binds+=(--bind "$VG_VIP")
			if [[ $DSR_DECAP = userspace ]]; then decap=(--ipip-decap "$DECAP_TUN"); fi
		fi
		say "starting $name in $ns on ${binds[*]} (http $HTTP_PORT, udp $UDP_PORT)${decap:+, IPIP decapsulated into $DECAP_TUN}, log $STATE/$name.log"
		setsid ip netns exec "$ns" python3 "$BACKEND_PY" --name "$name" "${binds[@]}" \
			--http-port "$HTTP_PORT" --udp-port "$UDP_PORT" --pid-file "$pidf" "${decap[@]}" \
			</dev/null >>"$STATE/$name.log" 2>&1 &
		echo "$!" >"$pidf.launch"
	done
	mv -f "$STATE/backends.tmp" "$STATE/backends"
}

# backend_answers NS NAME ADDR HTTP_PORT UDP_PORT: NAME answers HTTP and UDP
# on ADDR, from inside NS.
backend_answers() {
	local ns=$1 name=$2 addr=$3 hp=$4 up=$5 body reply
	body=$(ip netns exec "$ns" curl -s --max-time 1 "http://$addr:$hp/" 2>/dev/null || true)
	[[ $body = "backend $name" ]] || return 1
	reply=$(ip netns exec "$ns" python3 -c "$UDP_PROBE" "$addr" "$up" 2>/dev/null || true)
	[[ $reply = "$name ping" ]]
}

# ARP requests "who has GATEWAY? tell SENDER" out of IFNAME, one per SENDER,
# broadcast: python3 -c "$ARP_ANNOUNCE" IFNAME GATEWAY SENDER...
ARP_ANNOUNCE='
import socket, struct, sys
ifname, target, senders = sys.argv[1], sys.argv[2], sys.argv[3:]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
mac = s.getsockname()[4]
for sender in senders:
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, socket.inet_aton(sender),
                      bytes(6), socket.inet_aton(target))
    s.send((b"\xff" * 6 + mac + b"\x08\x06" + arp).ljust(60, b"\0"))
'

announce_backends() {
	local i
	if [[ $MODE = dsr ]]; then
		say "announcing each backend to the gateway: ARP who-has $VG_BACKEND_GW from its address, out of $BACKEND_LAN_IF in ${PREFIX}b<i>"
		for ((i = 1; i <= BACKENDS; i++)); do
			ip netns exec "$(backend_ns "$i")" python3 -c "$ARP_ANNOUNCE" "$BACKEND_LAN_IF" "$VG_BACKEND_GW" "$(backend_addr "$i")" ||
				die "could not send the ARP announcement of backend-$i"
		done
	else
		local addrs=()
		for ((i = 1; i <= BACKENDS; i++)); do addrs+=("$(backend_addr "$i")"); done
		say "announcing the backends to the gateway: ARP who-has $VG_BACKEND_GW from ${addrs[*]}, out of $BACKEND_IF"
		ip netns exec "$BACKEND_NS" python3 -c "$ARP_ANNOUNCE" "$BACKEND_IF" "$VG_BACKEND_GW" "${addrs[@]}" ||
			die "could not send the backends' ARP announcements"
	fi
}

# Sends "ping" to ADDR PORT and prints the reply, waiting at most 1 s. The
# socket is connected, so only a reply from ADDR:PORT counts. (socat would
# always wait out its -t after the reply.)
UDP_PROBE='
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1)
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(b"ping")
sys.stdout.write(s.recv(65535).decode())
'

wait_backends() {
	local deadline name addr hp up ns pending i
	deadline=$(($(date +%s) + WAIT_S))
	say "waiting for ${ONLY_BACKEND:+backend-$ONLY_BACKEND of }$BACKENDS backend(s) to answer HTTP and UDP"
	while :; do
		pending=()
		while read -r name addr hp up ns; do
			[[ -z $ONLY_BACKEND || $name = "backend-$ONLY_BACKEND" ]] || continue
			if ! backend_answers "$ns" "$name" "$addr" "$hp" "$up"; then
				pending+=("$name")
			elif [[ $MODE = dsr ]] && ! backend_answers "$ns" "$name" "$VG_VIP" "$hp" "$up"; then
				pending+=("$name (on the VIP)")
			fi
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
	if [[ $MODE = dsr ]]; then
		say "all $BACKENDS backend(s) answer HTTP and UDP, on their addresses and on the VIP $VG_VIP"
	else
		say "all $BACKENDS backend(s) answer HTTP and UDP"
	fi
}

cmd_up() {
	local want i tools=(ip curl socat python3 setsid)
	require_root
	if [[ $MODE = dsr ]]; then tools+=(sysctl); fi
	for tool in "${tools[@]}"; do
		command -v "$tool" >/dev/null || die "$tool not found (run scripts/setup.sh)"
	done
	want=$(printf 'PREFIX=%s\nCLIENT_IF=%s\nBACKEND_IF=%s\nBACKENDS=%s\nHTTP_PORT=%s\nUDP_PORT=%s\nMODE=%s\n' \
		"$PREFIX" "$CLIENT_IF" "$BACKEND_IF" "$BACKENDS" "$HTTP_PORT" "$UDP_PORT" "$MODE")
	if [[ $MODE = dsr ]]; then want+=$'\n'"DSR_DECAP=$DSR_DECAP"; fi
	if ((!VIP_ROUTE)); then want+=$'\n'"VIP_ROUTE=0"; fi
	if ((GATEWAY_IN_NS)); then
		want+=$'\n'"GATEWAY_NS=$GATEWAY_NS"
		ns_exists "$GATEWAY_NS" || die "--gateway-ns: namespace $GATEWAY_NS does not exist; create it and start the gateway in it first"
	fi
	if [[ -f $STATE/rig.env ]]; then
		if [[ $(<"$STATE/rig.env") != "$want" ]]; then
			die "rig '$PREFIX' is already up with other settings (it has: $(grep -vxFf <(printf '%s\n' "$want") "$STATE/rig.env" | tr '\n' ' '); asked for: $(grep -vxFf "$STATE/rig.env" <(printf '%s\n' "$want") | tr '\n' ' ')); run: $0 down --prefix $PREFIX"
		fi
		say "rig '$PREFIX' already set up (mode $MODE); checking every part"
	fi
	# Before anything is created, so that a kernel without IPIP leaves
	# nothing behind.
	if [[ $MODE = dsr && $DSR_DECAP = kernel ]]; then
		require_ipip
	fi
	if [[ ! -f $STATE/rig.env ]]; then
		say "setting up rig '$PREFIX' in mode $MODE${DSR_DECAP:+ (IPIP decapsulation: $DSR_DECAP)} (state in $STATE)"
		mkdir -p "$STATE"
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
	if [[ $MODE = dsr ]]; then
		configure_lan
		configure_client_lan
		for ((i = 1; i <= BACKENDS; i++)); do
			configure_dsr_backend "$i"
		done
	else
		configure_backend
	fi
	start_backends
	wait_backends
	announce_backends
	if [[ $MODE = dsr ]]; then
		say "rig '$PREFIX' is up (dsr): client in $CLIENT_NS ($VG_CLIENT_ADDR, LAN leg $VG_CLIENT_LAN_ADDR), backend LAN $BACKEND_NS, $BACKENDS backend(s) in ${PREFIX}b1..${PREFIX}b$BACKENDS"
	else
		say "rig '$PREFIX' is up ($MODE): client in $CLIENT_NS ($VG_CLIENT_ADDR), $BACKENDS backend(s) in $BACKEND_NS"
	fi
}

cmd_down() {
	local f pid ns pids=() namespaces left
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
	mapfile -t namespaces < <(rig_namespaces)
	for ns in "${namespaces[@]}"; do
		for pid in $(ip netns pids "$ns" 2>/dev/null || true); do
			[[ " ${pids[*]} " = *" $pid "* ]] && continue
			say "stopping pid $pid, still running in $ns: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-100)"
			pids+=("$pid")
		done
	done
	stop_pids 5 "${pids[@]}"
	# The veths, the bridge and the taps go with their namespaces.
	for ns in "${namespaces[@]}"; do
		ns_exists "$ns" || continue
		say "deleting namespace $ns"
		ip netns del "$ns" 2>/dev/null || warn "could not delete namespace $ns"
	done
	if [[ -d $STATE ]]; then
		say "removing $STATE"
		rm -rf "$STATE"
	fi
	left=$(rig_namespaces | tr '\n' ' ')
	[[ -z $left ]] || warn "namespaces still present: $left"
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
	local ns name addr hp up pid st found=0
	if [[ -f $STATE/rig.env ]]; then
		say "settings: $(tr '\n' ' ' <"$STATE/rig.env")"
	fi
	while read -r ns; do
		found=1
		say "namespace $ns:"
		ip -n "$ns" -br addr show | sed 's/^/    /'
		ip -n "$ns" route show | sed 's/^/    route /'
	done < <(rig_namespaces)
	((found)) || say "no namespace of rig '$PREFIX'"
	if [[ -f $STATE/backends ]]; then
		while read -r name addr hp up ns; do
			pid=$(cat "$STATE/$name.pid" 2>/dev/null || true)
			if [[ -n $pid ]] && is_backend_pid "$pid"; then st="running (pid $pid)"; else st="NOT running"; fi
			say "$name $addr http $hp udp $up in ${ns:-$BACKEND_NS}: $st"
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
