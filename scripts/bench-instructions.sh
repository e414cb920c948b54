#!/usr/bin/env bash
# Instructions per packet of the packet core, counted by callgrind.
#
#   scripts/bench-instructions.sh [--bursts N]   (default 2000)
#
# Builds benches/instructions.rs with the bench profile, runs each workload
# (forward, reverse, drop) under `valgrind --tool=callgrind` with N and 2N
# bursts of 32 packets, and prints (Ir(2N) - Ir(N)) / (N * 32): the
# instructions one packet costs, with start-up and set-up cancelled out.
# The count includes restoring each 60-byte frame before its burst.
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."

bursts=2000
if [[ ${1:-} == --bursts ]]; then bursts=$2; fi

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

count() { # WORKLOAD BURSTS -> total instructions
	valgrind --tool=callgrind --callgrind-out-file="$tmp/cg.out" "$bin" "$1" "$2" >/dev/null 2>"$tmp/vg.log"
	sed -n 's/^summary: //p' "$tmp/cg.out"
}

printf '%-10s %14s %14s %12s\n' workload "Ir(${bursts})" "Ir($((2 * bursts)))" "Ir/packet"
for w in forward reverse drop; do
	a=$(count "$w" "$bursts")
	b=$(count "$w" $((2 * bursts)))
	per=$(python3 -c "print(f'{($b - $a) / ($bursts * 32):.1f}')")
	printf '%-10s %14s %14s %12s\n' "$w" "$a" "$b" "$per"
done
