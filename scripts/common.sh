# shellcheck shell=bash disable=SC2034
# Helpers shared by the vipgate scripts. Source it; do not run it.
#
# Every script that sources this file sets VG_TAG first (for example
# VG_TAG=rig), so that each line it prints says which script took the step.

VG_TAG=${VG_TAG:-vipgate}
VG_SCRIPTS_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
VG_ROOT=$(cd -- "$VG_SCRIPTS_DIR/.." && pwd)

# Where setup.sh records its hugepage decision (sourced by demo.sh, test.sh).
VG_ENV_DIR=/run/vipgate
VG_HUGEPAGES_ENV=$VG_ENV_DIR/hugepages.env

# Where rig.sh keeps the state of each rig (one directory per prefix).
VG_RIG_STATE_ROOT=/run/vipgate-rig

# The IPv4 plan of the rig (test networks: 198.18.0.0/15 only).
VG_CLIENT_NET=198.18.0.0/24
VG_CLIENT_GW=198.18.0.1
VG_CLIENT_ADDR=198.18.0.2
VG_BACKEND_NET_PREFIX=198.18.1 # backend i (1-based) is 198.18.1.(10+i)
VG_BACKEND_GW=198.18.1.1
# In dsr mode the client also has a leg in the backend LAN (rig.sh): the
# backends send their replies straight to it, not through the gateway.
VG_CLIENT_LAN_ADDR=198.18.1.200
VG_VIP_NET=198.18.100.0/24
VG_VIP=198.18.100.1
VG_HTTP_PORT=8080
VG_UDP_PORT=5353

say() { printf '==> %s: %s\n' "$VG_TAG" "$*"; }
# Prints the calling script's header comment (from its second line to its
# `set -euo pipefail`): every script's --help.
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
# For a script that takes no arguments: `-h` or `--help` prints its usage
# and exits; any other argument is refused.
no_arguments() {
	case ${1:-} in
	-h | --help)
		usage
		exit 0
		;;
	"") ;;
	*) die "unknown argument: $1 (usage: scripts/$(basename -- "$0"))" ;;
	esac
}
warn() { printf '==> %s: WARNING: %s\n' "$VG_TAG" "$*" >&2; }
die() {
	printf '==> %s: ERROR: %s\n' "$VG_TAG" "$*" >&2
	exit 1
}

require_root() {
	if [[ $(id -u) -ne 0 ]]; then
		die "must run as root (it manages hugepages, network namespaces and DPDK); try: sudo $0"
	fi
}

# rustup installs into ~/.cargo/bin, which a root login shell (sudo -i, su -)
# may not have on PATH.
add_cargo_to_path() {
	if ! command -v cargo >/dev/null 2>&1 && [[ -x ${CARGO_HOME:-$HOME/.cargo}/bin/cargo ]]; then
		PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
		export PATH
	fi
}

# The target directory cargo writes to.
cargo_target_dir() {
	local dir=${CARGO_TARGET_DIR:-$VG_ROOT/target}
	[[ $dir = /* ]] || dir=$VG_ROOT/$dir
	printf '%s\n' "$dir"
}

# Seconds since the epoch, with a fraction (for elapsed-time messages).
now_s() { date +%s.%N; }
elapsed_s() { awk -v a="$1" -v b="$(now_s)" 'BEGIN { printf "%.1f", b - a }'; }

pid_alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }

# stop_pid PID [TIMEOUT_S]: SIGTERM, wait up to TIMEOUT_S (default 5), then
# SIGKILL. Works for processes that are not children of this shell.
# Returns 0 if the process exited on SIGTERM, 1 if it needed SIGKILL.
stop_pid() {
	local pid=$1 timeout=${2:-5} i
	pid_alive "$pid" || return 0
	kill -TERM "$pid" 2>/dev/null || return 0
	for ((i = 0; i < timeout * 10; i++)); do
		pid_alive "$pid" || return 0
		sleep 0.1
	done
	kill -KILL "$pid" 2>/dev/null || true
	for ((i = 0; i < 50; i++)); do
		pid_alive "$pid" || break
		sleep 0.1
	done
	return 1
}

# stop_pids TIMEOUT_S PID...: SIGTERM to all at once (stopping them one at a
# time adds up), then stop_pid each; warns about any that needed SIGKILL.
stop_pids() {
	local timeout=$1 pid
	shift
	(($#)) || return 0
	kill -TERM "$@" 2>/dev/null || true
	for pid in "$@"; do
		stop_pid "$pid" "$timeout" || warn "process $pid needed SIGKILL"
	done
}

# remove_dpdk_files PREFIX: what a DPDK process with --file-prefix PREFIX
# left behind: its runtime directory, and its hugepage files, matched as
# exactly PREFIXmap_<n> so that another prefix's files (say, those of
# "amap_x" for prefix "a") are never touched. Warns about each hugepage file.
remove_dpdk_files() {
	local prefix=$1 f n
	rm -rf "/var/run/dpdk/$prefix"
	for f in /dev/hugepages/"$prefix"map_*; do
		[[ -e $f ]] || continue
		n=${f#/dev/hugepages/"$prefix"map_}
		[[ $n =~ ^[0-9]+$ ]] || continue
		warn "removing leftover hugepage file $f"
		rm -f "$f"
	done
}

# The hugepage decision setup.sh made (VIPGATE_HUGEPAGES=1|0), unless the
# caller already forced one in the environment.
load_hugepages_env() {
	local forced=${VIPGATE_HUGEPAGES:-}
	if [[ -r $VG_HUGEPAGES_ENV ]]; then
		# shellcheck source=/dev/null
		source "$VG_HUGEPAGES_ENV"
	fi
	if [[ -n $forced ]]; then
		VIPGATE_HUGEPAGES=$forced
	fi
	VIPGATE_HUGEPAGES=${VIPGATE_HUGEPAGES:-0}
	export VIPGATE_HUGEPAGES
}

# run_fg CMD...: runs CMD in its own session (stdin from /dev/null) and waits
# for it. Unlike a plain foreground command, the wait returns as soon as the
# script gets a trapped SIGTERM or SIGINT; the exit trap then calls stop_fg,
# which stops CMD's whole process group.
FG_PID=""
run_fg() {
	local rc=0
	setsid "$@" </dev/null &
	FG_PID=$!
	wait "$FG_PID" || rc=$?
	FG_PID=""
	return "$rc"
}

stop_fg() {
	local i
	pid_alive "$FG_PID" || return 0
	kill -TERM -- "-$FG_PID" 2>/dev/null || kill -TERM "$FG_PID" 2>/dev/null || true
	# Give it (nextest: its tests) time to clean up, then insist.
	for ((i = 0; i < 300; i++)); do
		[[ $(awk '{print $3}' "/proc/$FG_PID/stat" 2>/dev/null) =~ ^(Z|)$ ]] && break
		sleep 0.1
	done
	kill -KILL -- "-$FG_PID" 2>/dev/null || true
	wait "$FG_PID" 2>/dev/null || true
	FG_PID=""
}
