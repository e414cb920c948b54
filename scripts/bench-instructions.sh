#!/usr/bin/env bash
# Instructions per packet of the packet core, counted by callgrind.
#
#   scripts/bench-instructions.sh [--bursts N]   (default 2000)
#
# Builds benches/instructions.rs with the bench profile, runs each workload
# (forward, reverse, drop; forward-fullnat, reverse-fullnat, forward-dsr;
# handoff: a worker's cost to hand a packet to its owner; fragments: TCP
# segments in 4 fragments each, through the fragment table; vlan: forward
# tagged 802.1Q in and out) under
# `valgrind --tool=callgrind` with N and 2N
# bursts of 32 packets, and prints (Ir(2N) - Ir(N)) / (N * 32): the
# instructions one packet costs, with start-up and set-up cancelled out
# (the median of three such pairs; the Ir columns are the last pair's).
# The count includes restoring each 60-byte frame (and its 64 bytes of
# headroom) before its burst.
#
# A second table measures connection tracking at scale: 1, 10k and 1M
# concurrent flows, packets of established flows and of new flows (each a
# flow never seen, inserted into a table already holding that many), with
# --scale-bursts N and 2N bursts (default 500). Frames are prepared per
# packet; the `prepare` workload, which only prepares them, is subtracted.
#
# A third table measures new connections (SYNs, each of a flow never seen,
# into a table of 10k flows) to a service without a new-flow limit, with a
# limit every SYN stays within, and with one all but each source's first
# exceed (dropped as rate_limited); `prepare` is subtracted as above.
#
# A fourth table measures the service options at 10k flows, each beside
# the plain case of the same run: established packets to a service with a
# source list of 1 and of 16 prefixes and with client-IP affinity, SYNs
# (new connections) with 16 prefixes and with affinity, and SYNs from
# outside the 16 prefixes (dropped as source_denied). --only-options runs
# this table alone.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."

bursts=2000
scale_bursts=500
only_options=0
while (($#)); do
	case $1 in
	--bursts) bursts=$2; shift 2 ;;
	--scale-bursts) scale_bursts=$2; shift 2 ;;
	--only-options) only_options=1; shift ;;
	*) echo "usage: $0 [--bursts N] [--scale-bursts N] [--only-options]" >&2; exit 2 ;;
	esac
done

if ! command -v valgrind >/dev/null; then
	echo "==> bench-instructions: installing valgrind"
	apt-get install -y -qq valgrind >/dev/null
fi

echo "==> bench-instructions: building benches/instructions.rs (bench profile)"
bin=$(cargo bench -p vipgate --bench instructions --no-run --message-format=json 2>/dev/null |
	python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="instructions" and m.get("executable"):
        print(m["executable"])')
[[ -x $bin ]] || { echo "==> bench-instructions: build failed" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# A workload whose checks fail (a packet not forwarded, a drop of the wrong
# reason) stops the script: its instruction count would measure something
# else.
run_counted() { # ARGS... -> total instructions
	if ! valgrind --tool=callgrind --callgrind-out-file="$tmp/cg.out" "$bin" "$@" >"$tmp/out.log" 2>"$tmp/vg.log"; then
		echo "==> bench-instructions: workload $* failed:" >&2
		tail -n 20 "$tmp/vg.log" >&2
		exit 1
	fi
	sed -n 's/^summary: //p' "$tmp/cg.out"
}

count() { # WORKLOAD BURSTS -> total instructions
	run_counted "$1" "$2"
}

count3() { # WORKLOAD FLOWS BURSTS -> total instructions
	run_counted "$1" "$2" "$3"
}

per_packet() { # WORKLOAD FLOWS -> instructions per packet
	local a b
	a=$(count3 "$1" "$2" "$scale_bursts")
	b=$(count3 "$1" "$2" $((2 * scale_bursts)))
	python3 -c "print(($b - $a) / ($scale_bursts * 32))"
}

if ((!only_options)); then
	printf '%-16s %14s %14s %12s\n' workload "Ir(${bursts})" "Ir($((2 * bursts)))" "Ir/packet"
	# Each process seeds its hash maps afresh (the snapshot's service and
	# reverse maps use a random hash state), so one process's lookups may
	# probe a group more than the next one's: a pair of runs can be off by
	# tens of instructions. Each row is the median of three pairs.
	for w in forward reverse drop forward-fullnat reverse-fullnat forward-dsr handoff fragments vlan; do
		pers=()
		for _ in 1 2 3; do
			a=$(count "$w" "$bursts")
			b=$(count "$w" $((2 * bursts)))
			pers+=("$(python3 -c "print(f'{($b - $a) / ($bursts * 32):.1f}')")")
		done
		per=$(printf '%s\n' "${pers[@]}" | sort -n | sed -n 2p)
		printf '%-16s %14s %14s %12s\n' "$w" "$a" "$b" "$per"
	done

	echo
	printf '%-10s %16s %16s %14s\n' flows "established Ir/pkt" "new-flow Ir/pkt" "prepare Ir/pkt"
	for flows in 1 10000 1000000; do
		prep=$(per_packet prepare "$flows")
		est=$(per_packet established "$flows")
		new=$(per_packet new "$flows")
		python3 -c "print(f'{$flows:<10} {$est - $prep:16.1f} {$new - $prep:16.1f} {$prep:14.1f}')"
	done

	echo
	printf '%-10s %16s %16s %16s\n' flows "SYN no limit" "SYN within limit" "SYN over limit"
	prep=$(per_packet prepare 10000)
	syn=$(per_packet new-syn 10000)
	within=$(per_packet new-limited 10000)
	over=$(per_packet refused 10000)
	python3 -c "print(f'{10000:<10} {$syn - $prep:16.1f} {$within - $prep:16.1f} {$over - $prep:16.1f}')"
	echo
fi

# The service options, at 10k flows: each workload minus `prepare`, and
# its difference from the plain workload of the same run.
printf '%-22s %12s %12s\n' "workload (10k flows)" "Ir/packet" "vs plain"
prep=$(per_packet prepare 10000)
for group in "established established-src1 established-src16 established-affinity" \
	"new-syn new-syn-src16 new-syn-affinity denied-src16"; do
	read -r -a ws <<<"$group"
	base=
	for w in "${ws[@]}"; do
		v=$(per_packet "$w" 10000)
		v=$(python3 -c "print($v - $prep)")
		[[ -n $base ]] || base=$v
		python3 -c "print(f'{\"$w\":<22} {$v:12.1f} {$v - $base:+12.1f}')"
	done
done
