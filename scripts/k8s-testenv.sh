#!/usr/bin/env bash
# A real kube-apiserver and etcd on loopback, for the Kubernetes integration
# tests (the same idea as controller-runtime's envtest).
#
#   scripts/k8s-testenv.sh start DIR   start etcd and kube-apiserver, state in DIR
#   scripts/k8s-testenv.sh stop DIR    stop what 'start DIR' started (idempotent)
#   scripts/k8s-testenv.sh smoke       start in a temporary directory, drive a
#                                      LoadBalancer Service with kubectl, stop
#
# The binaries come from scripts/k8s-build.sh (run it first; start runs it if
# they are missing). 'start DIR' creates DIR and in it:
#   pki/         a CA, the apiserver's serving certificate (127.0.0.1, ::1,
#                localhost), the service-account key pair, and an admin client
#                certificate (CN admin, O system:masters), all made by openssl
#   etcd/        etcd's data (a fresh one on each start)
#   *.log        etcd's and kube-apiserver's logs
#   *.pid        the processes start started (what stop stops)
#   env          the ports and URLs, as shell assignments
#   kubeconfig   admin credentials for the apiserver
# and prints 'export KUBECONFIG=DIR/kubeconfig' as its last line.
#
# Everything listens on 127.0.0.1 only, on free ports. Services get cluster
# IPs from 198.18.128.0/24 (a test range; VIPGATE_K8S_SERVICE_RANGE may name
# another inside 198.18.0.0/15 or 2001:db8::/32, or two for dual stack).
# Authorization is RBAC. There is no kubelet, controller-manager or
# scheduler: the tests create Nodes and EndpointSlices themselves; nothing
# runs Pods, garbage-collects or finishes the deletion of namespaces. The
# ServiceAccount admission plugin is off (no controller creates the 'default'
# service account Pods would need).
# 'stop DIR' stops the processes and removes the pid files, env and
# kubeconfig; it leaves the certificates, the logs and etcd's data for a look
# after a failure ('start DIR' again starts on fresh data).
#
# Environment:
#   VIPGATE_CACHE=/var/cache/vipgate       where k8s-build.sh put the binaries
#   VIPGATE_K8S_START_TIMEOUT=60           seconds to wait for /readyz
#   VIPGATE_K8S_SERVICE_RANGE=198.18.128.0/24   --service-cluster-ip-range
#                                 (dual stack: 198.18.128.0/24,2001:db8:0:80::/112)
#   VIPGATE_K8S_NODE_PORTS=30000-32767     --service-node-port-range (the
#                                 tests' node namespaces serve on 8080)
set -euo pipefail

VG_TAG=k8s-testenv
# shellcheck source=scripts/common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"


# The version k8s-build.sh builds (one place: its KUBE_VERSION line).
KUBE_VERSION=$(sed -n 's/^KUBE_VERSION=//p' "$VG_SCRIPTS_DIR/k8s-build.sh")
K8S_BIN=${VIPGATE_CACHE:-/var/cache/vipgate}/k8s/$KUBE_VERSION/bin
APISERVER=$K8S_BIN/kube-apiserver
ETCD=$K8S_BIN/etcd
START_TIMEOUT=${VIPGATE_K8S_START_TIMEOUT:-60}
SERVICE_RANGE=${VIPGATE_K8S_SERVICE_RANGE:-198.18.128.0/24}
NODE_PORTS=${VIPGATE_K8S_NODE_PORTS:-30000-32767}
[[ $NODE_PORTS =~ ^[0-9]+-[0-9]+$ ]] || die "VIPGATE_K8S_NODE_PORTS=$NODE_PORTS: not a range like 30000-32767"

# free_ports N: N distinct TCP ports free on 127.0.0.1 (the kernel picks them;
# they are free when this returns, as envtest does it).
free_ports() {
	python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# spawn LOG CMD...: CMD in its own session, detached from this script;
# prints its PID.
spawn() {
	local log=$1
	shift
	setsid "$@" </dev/null >"$log" 2>&1 &
	printf '%s\n' "$!"
}

# Our process PID of binary NAME, recorded in FILE, if it is still running
# (a recycled PID of another program does not count).
recorded_pid() {
	local file=$1 name=$2 pid
	[[ -r $file ]] || return 1
	pid=$(<"$file")
	[[ $pid =~ ^[0-9]+$ ]] || return 1
	pid_alive "$pid" || return 1
	[[ $(readlink "/proc/$pid/exe" 2>/dev/null) == */"$name" ]] || return 1
	printf '%s\n' "$pid"
}

show_logs() {
	local dir=$1 f
	for f in "$dir/etcd.log" "$dir/kube-apiserver.log"; do
		[[ -r $f ]] || continue
		printf -- '--- last lines of %s\n' "$f" >&2
		tail -n 25 "$f" >&2
	done
}

# ossl ARGS...: openssl, quiet; on failure, its messages and the end.
ossl() {
	local out
	out=$(openssl "$@" 2>&1) || die "openssl $1 failed: $out"
}

# gen_pki DIR "SVC_IP...": the CA, the certificates, the service-account keys.
gen_pki() {
	local pki=$1 svc_ips=$2 old_umask ip san=IP:127.0.0.1,IP:::1,DNS:localhost
	mkdir -p "$pki"
	old_umask=$(umask)
	umask 077
	ossl req -x509 -newkey rsa:2048 -nodes -keyout "$pki/ca.key" -out "$pki/ca.crt" \
		-days 365 -subj "/CN=vipgate-testenv-ca" \
		-addext "basicConstraints=critical,CA:TRUE" \
		-addext "keyUsage=critical,keyCertSign,cRLSign"
	# The apiserver's serving certificate: the loopback names, and the
	# 'kubernetes' Service's names and cluster IPs.
	for ip in $svc_ips; do
		san+=",IP:$ip"
	done
	san+=",DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
	printf '%s\n' "basicConstraints=CA:FALSE" \
		"keyUsage=critical,digitalSignature,keyEncipherment" \
		"extendedKeyUsage=serverAuth" \
		"subjectAltName=$san" \
		>"$pki/apiserver.ext"
	ossl req -newkey rsa:2048 -nodes -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" \
		-subj "/CN=kube-apiserver"
	ossl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
		-CAcreateserial -CAserial "$pki/ca.srl" -out "$pki/apiserver.crt" -days 365 \
		-extfile "$pki/apiserver.ext"
	# The admin: system:masters, which RBAC lets do anything.
	printf '%s\n' "basicConstraints=CA:FALSE" \
		"keyUsage=critical,digitalSignature,keyEncipherment" \
		"extendedKeyUsage=clientAuth" >"$pki/admin.ext"
	ossl req -newkey rsa:2048 -nodes -keyout "$pki/admin.key" -out "$pki/admin.csr" \
		-subj "/O=system:masters/CN=admin"
	ossl x509 -req -in "$pki/admin.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
		-CAserial "$pki/ca.srl" -out "$pki/admin.crt" -days 365 -extfile "$pki/admin.ext"
	# The service-account token signing key pair.
	ossl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$pki/sa.key"
	ossl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub"
	rm -f "$pki"/*.csr "$pki"/*.ext "$pki/ca.srl"
	umask "$old_umask"
}

cmd_start() {
	local dir=$1 t0 etcd_client etcd_peer api_port etcd_pid api_pid i
	t0=$(now_s)
	mkdir -p "$dir"
	dir=$(cd "$dir" && pwd)
	if recorded_pid "$dir/kube-apiserver.pid" kube-apiserver >/dev/null ||
		recorded_pid "$dir/etcd.pid" etcd >/dev/null; then
		die "a test environment is already running in $dir (scripts/k8s-testenv.sh stop $dir)"
	fi
	if [[ ! -x $APISERVER || ! -x $ETCD ]]; then
		say "no binaries in $K8S_BIN: running scripts/k8s-build.sh"
		"$VG_SCRIPTS_DIR/k8s-build.sh"
	fi
	command -v openssl >/dev/null || die "openssl is missing (apt-get install openssl)"
	command -v curl >/dev/null || die "curl is missing (apt-get install curl)"

	# The service ranges (one, or two for dual stack) must be test ranges.
	# Prints the advertise address (the first range's family) and the first
	# address of each range (the 'kubernetes' Service's cluster IPs).
	local advertise svc_ips
	read -r advertise svc_ips < <(python3 - "$SERVICE_RANGE" <<-'EOF' || echo fail
		import ipaddress, sys
		tests = [ipaddress.ip_network(n) for n in ("198.18.0.0/15", "2001:db8::/32")]
		nets = []
		for r in sys.argv[1].split(","):
		    try:
		        net = ipaddress.ip_network(r)
		    except ValueError as e:
		        sys.exit(f"not a network: {e}")
		    if not any(net.version == t.version and net.subnet_of(t) for t in tests):
		        sys.exit(f"{net} is not inside 198.18.0.0/15 or 2001:db8::/32")
		    nets.append(net)
		print("127.0.0.1" if nets[0].version == 4 else "::1", *(n[1] for n in nets))
	EOF
	)
	[[ -n ${svc_ips:-} ]] || die "VIPGATE_K8S_SERVICE_RANGE=$SERVICE_RANGE: see above"
	local pki=$dir/pki
	gen_pki "$pki" "$svc_ips"
	read -r etcd_client etcd_peer api_port < <(free_ports 3)
	rm -rf "$dir/etcd"
	rm -f "$dir/etcd.pid" "$dir/kube-apiserver.pid" "$dir/kubeconfig"
	cat >"$dir/env" <<-EOF
		KUBE_VERSION=$KUBE_VERSION
		ETCD_URL=http://127.0.0.1:$etcd_client
		ETCD_PEER_URL=http://127.0.0.1:$etcd_peer
		APISERVER_URL=https://127.0.0.1:$api_port
		APISERVER_PORT=$api_port
		SERVICE_RANGE=$SERVICE_RANGE
		KUBECONFIG=$dir/kubeconfig
	EOF

	say "starting etcd on 127.0.0.1:$etcd_client (peer $etcd_peer)"
	# No fsync: test data, and it makes each write much faster.
	etcd_pid=$(spawn "$dir/etcd.log" "$ETCD" \
		--name testenv --data-dir "$dir/etcd" \
		--listen-client-urls "http://127.0.0.1:$etcd_client" \
		--advertise-client-urls "http://127.0.0.1:$etcd_client" \
		--listen-peer-urls "http://127.0.0.1:$etcd_peer" \
		--initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
		--initial-cluster "testenv=http://127.0.0.1:$etcd_peer" \
		--initial-cluster-state new \
		--unsafe-no-fsync)
	echo "$etcd_pid" >"$dir/etcd.pid"

	fail_start() {
		warn "$1"
		show_logs "$dir"
		cmd_stop "$dir" >/dev/null 2>&1 || true
		die "the test environment in $dir did not start"
	}
	for ((i = 0; ; i++)); do
		pid_alive "$etcd_pid" || fail_start "etcd exited"
		curl -fsS -m 2 "http://127.0.0.1:$etcd_client/health" 2>/dev/null | grep -q '"health":"true"' && break
		((i < START_TIMEOUT * 10)) || fail_start "etcd not healthy after ${START_TIMEOUT} s"
		sleep 0.1
	done

	say "starting kube-apiserver $KUBE_VERSION on https://127.0.0.1:$api_port"
	api_pid=$(spawn "$dir/kube-apiserver.log" "$APISERVER" \
		--etcd-servers "http://127.0.0.1:$etcd_client" \
		--bind-address 127.0.0.1 --advertise-address "$advertise" \
		--secure-port "$api_port" --cert-dir "$pki" \
		--tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
		--client-ca-file "$pki/ca.crt" \
		--service-account-issuer https://kubernetes.default.svc \
		--service-account-key-file "$pki/sa.pub" \
		--service-account-signing-key-file "$pki/sa.key" \
		--service-cluster-ip-range "$SERVICE_RANGE" \
		--service-node-port-range "$NODE_PORTS" \
		--authorization-mode RBAC \
		--disable-admission-plugins ServiceAccount \
		--allow-privileged=true \
		--profiling=false)
	echo "$api_pid" >"$dir/kube-apiserver.pid"

	local curl_auth=(--cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key")
	for ((i = 0; ; i++)); do
		pid_alive "$etcd_pid" || fail_start "etcd exited"
		pid_alive "$api_pid" || fail_start "kube-apiserver exited"
		[[ $(curl -sS -m 2 "${curl_auth[@]}" "https://127.0.0.1:$api_port/readyz" 2>/dev/null) == ok ]] && break
		((i < START_TIMEOUT * 10)) || fail_start "kube-apiserver not ready (/readyz) after ${START_TIMEOUT} s"
		sleep 0.1
	done

	cat >"$dir/kubeconfig" <<-EOF
		apiVersion: v1
		kind: Config
		clusters:
		- name: vipgate-testenv
		  cluster:
		    server: https://127.0.0.1:$api_port
		    certificate-authority: $pki/ca.crt
		users:
		- name: admin
		  user:
		    client-certificate: $pki/admin.crt
		    client-key: $pki/admin.key
		contexts:
		- name: vipgate-testenv
		  context:
		    cluster: vipgate-testenv
		    user: admin
		current-context: vipgate-testenv
	EOF
	chmod 600 "$dir/kubeconfig"
	say "ready in $(elapsed_s "$t0") s (etcd pid $etcd_pid, kube-apiserver pid $api_pid)"
	echo "export KUBECONFIG=$dir/kubeconfig"
}

cmd_stop() {
	local dir=$1 pids=() pid name
	if [[ ! -d $dir ]]; then
		say "nothing to stop: no directory $dir"
		return 0
	fi
	# The apiserver first, so that it does not log etcd's going away.
	for name in kube-apiserver etcd; do
		if pid=$(recorded_pid "$dir/$name.pid" "$name"); then
			say "stopping $name (pid $pid)"
			stop_pid "$pid" 10 || warn "$name (pid $pid) needed SIGKILL"
			pids+=("$pid")
		fi
		rm -f "$dir/$name.pid"
	done
	# What describes a running environment goes with it.
	rm -f "$dir/kubeconfig" "$dir/env"
	((${#pids[@]})) || say "nothing was running in $dir"
}

# smoke: the whole life of a LoadBalancer Service of class vipgate.io/gateway,
# driven by kubectl, against a fresh test environment.
cmd_smoke() {
	local dir svc=web ns=default api_port ports
	command -v kubectl >/dev/null || die "kubectl is missing"
	dir=$(mktemp -d /tmp/vipgate-k8s-smoke.XXXXXX)
	# shellcheck disable=SC2064
	trap "smoke_cleanup '$dir'" EXIT
	trap 'exit 130' INT TERM

	cmd_start "$dir"
	export KUBECONFIG=$dir/kubeconfig
	api_port=$(sed -n 's/^APISERVER_PORT=//p' "$dir/env")
	ports=$(sed -n 's/^ETCD_\(PEER_\)\{0,1\}URL=http:\/\/127.0.0.1://p' "$dir/env" | tr '\n' ' ')$api_port

	say "kubectl $(kubectl version -o json 2>/dev/null | python3 -c 'import json,sys; v=json.load(sys.stdin); print("client", v["clientVersion"]["gitVersion"], "server", v["serverVersion"]["gitVersion"])')"

	say "creating Node vg-node-1 (no kubelet: the test makes it)"
	kubectl apply -f - <<-'EOF'
		apiVersion: v1
		kind: Node
		metadata:
		  name: vg-node-1
		  labels:
		    kubernetes.io/hostname: vg-node-1
	EOF
	kubectl patch node vg-node-1 --subresource=status --type=merge \
		-p '{"status":{"addresses":[{"type":"InternalIP","address":"198.18.1.1"}]}}'
	kubectl get nodes -o wide

	say "applying Service $svc (type LoadBalancer, loadBalancerClass vipgate.io/gateway)"
	kubectl apply -f - <<-EOF
		apiVersion: v1
		kind: Service
		metadata:
		  name: $svc
		  namespace: $ns
		spec:
		  type: LoadBalancer
		  loadBalancerClass: vipgate.io/gateway
		  selector:
		    app: $svc
		  ports:
		  - name: http
		    protocol: TCP
		    port: $VG_HTTP_PORT
		    targetPort: $VG_HTTP_PORT
	EOF
	kubectl get svc "$svc" -n "$ns"
	local cluster_ip node_port
	cluster_ip=$(kubectl get svc "$svc" -n "$ns" -o jsonpath='{.spec.clusterIP}')
	node_port=$(kubectl get svc "$svc" -n "$ns" -o jsonpath='{.spec.ports[0].nodePort}')
	python3 -c 'import ipaddress, sys; sys.exit(ipaddress.ip_address(sys.argv[1]) not in ipaddress.ip_network(sys.argv[2]))' \
		"$cluster_ip" "$SERVICE_RANGE" || die "clusterIP '$cluster_ip' is not in $SERVICE_RANGE"
	[[ $node_port =~ ^[0-9]+$ ]] || die "no nodePort allocated (got '$node_port')"
	say "allocated clusterIP $cluster_ip, nodePort $node_port"

	say "creating EndpointSlice $svc-1 (no controller makes them: the test does)"
	kubectl apply -f - <<-EOF
		apiVersion: discovery.k8s.io/v1
		kind: EndpointSlice
		metadata:
		  name: $svc-1
		  namespace: $ns
		  labels:
		    kubernetes.io/service-name: $svc
		    endpointslice.kubernetes.io/managed-by: testenv.vipgate.io
		addressType: IPv4
		ports:
		- name: http
		  protocol: TCP
		  port: $VG_HTTP_PORT
		endpoints:
		- addresses: ["${VG_BACKEND_NET_PREFIX}.11"]
		  conditions: {ready: true}
		  nodeName: vg-node-1
		- addresses: ["${VG_BACKEND_NET_PREFIX}.12"]
		  conditions: {ready: true}
		  nodeName: vg-node-1
	EOF
	kubectl get endpointslices -n "$ns" -l "kubernetes.io/service-name=$svc"

	say "setting status.loadBalancer.ingress to $VG_VIP (status subresource)"
	kubectl patch svc "$svc" -n "$ns" --subresource=status --type=merge \
		-p "{\"status\":{\"loadBalancer\":{\"ingress\":[{\"ip\":\"$VG_VIP\",\"ipMode\":\"VIP\"}]}}}"
	kubectl get svc "$svc" -n "$ns"
	local external
	external=$(kubectl get svc "$svc" -n "$ns" -o jsonpath='{.status.loadBalancer.ingress[0].ip}')
	[[ $external == "$VG_VIP" ]] || die "status.loadBalancer.ingress[0].ip is '$external', not $VG_VIP"
	kubectl get svc "$svc" -n "$ns" --no-headers | awk -v vip="$VG_VIP" '$4 == vip { found = 1 } END { exit !found }' ||
		die "kubectl get svc does not show $VG_VIP as EXTERNAL-IP"

	say "stopping"
	local pids pid port
	pids="$(<"$dir/etcd.pid") $(<"$dir/kube-apiserver.pid")"
	trap - EXIT
	smoke_cleanup "$dir"
	for pid in $pids; do
		! pid_alive "$pid" || die "process $pid still running after stop"
	done
	[[ ! -e $dir ]] || die "$dir is still there"
	for port in $ports; do
		if ss -Htln "sport = :$port" | grep -q .; then
			die "port $port still listening after stop"
		fi
	done
	say "smoke passed: processes $pids gone, nothing listening on ports $ports, $dir removed"
}

smoke_cleanup() {
	local dir=$1
	cmd_stop "$dir" || true
	rm -rf "$dir"
}

case ${1:-} in
start | stop)
	[[ $# -eq 2 && -n $2 ]] || die "usage: scripts/k8s-testenv.sh $1 DIR"
	"cmd_$1" "$2"
	;;
smoke)
	[[ $# -eq 1 ]] || die "usage: scripts/k8s-testenv.sh smoke"
	cmd_smoke
	;;
-h | --help)
	usage
	;;
*)
	usage >&2
	exit 2
	;;
esac
