# The Kubernetes part of scripts/demo.sh --k8s (sourced by it, not run on
# its own): a real kube-apiserver and etcd on loopback
# (scripts/k8s-testenv.sh), the CRDs, a VipPool, the demo's vipgated as a
# VipGateway, a Node for each backend namespace address, vipgate-k8s, and a
# Service of type LoadBalancer applied with kubectl; the demo's requests
# then go to the address the Service gets.
# shellcheck shell=bash

K8S_DIR=$STATE/k8s
K8S_PIDFILE=$STATE/vipgate-k8s.pid
K8S_LOG=$STATE/vipgate-k8s.log
VIPGATE_K8S=${VIPGATE_K8S_BIN:-$TARGET_DIR/release/vipgate-k8s}
K8S_POOL=198.18.100.64/28

kc() {
	kubectl --kubeconfig "$K8S_DIR/kubeconfig" "$@"
}

# Stops the controller and the apiserver; safe when neither runs.
k8s_down() {
	local pid
	pid=$(cat "$K8S_PIDFILE" 2>/dev/null || true)
	if [[ -n $pid ]] && pid_alive "$pid" && [[ $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) = *vipgate-k8s* ]]; then
		say "stopping vipgate-k8s (pid $pid)"
		stop_pid "$pid" 10 || warn "vipgate-k8s did not stop within 10s; it was killed"
	fi
	rm -f "$K8S_PIDFILE"
	if [[ -d $K8S_DIR ]]; then
		"$VG_SCRIPTS_DIR/k8s-testenv.sh" stop "$K8S_DIR" || warn "k8s-testenv.sh stop reported a problem"
	fi
}

# Sets VG_VIP to the address the demo Service got.
k8s_demo() {
	say "k8s 1/5: starting kube-apiserver and etcd (scripts/k8s-testenv.sh start $K8S_DIR)"
	VIPGATE_K8S_NODE_PORTS=5000-8999 "$VG_SCRIPTS_DIR/k8s-testenv.sh" start "$K8S_DIR" 9>&- | sed 's/^/    /'
	say "k8s 2/5: the CRDs (vipgate-k8s crds | kubectl apply -f -), a VipPool, the gateway, and the nodes"
	"$VIPGATE_K8S" crds | kc apply -f - | sed 's/^/    /'
	kc wait --for=condition=Established --timeout=60s crd/vippools.vipgate.io crd/vipgateways.vipgate.io >/dev/null
	local objects i
	objects=$(
		cat <<-YAML
			apiVersion: vipgate.io/v1alpha1
			kind: VipPool
			metadata: { name: demo }
			spec: { addresses: ["$K8S_POOL"] }
			---
			apiVersion: vipgate.io/v1alpha1
			kind: VipGateway
			metadata: { name: demo-gateway }
			spec: { endpoint: "unix://$SOCKET" }
		YAML
	)
	for ((i = 1; i <= BACKENDS; i++)); do
		objects+=$'\n---\n'"apiVersion: v1
kind: Node
metadata: { name: node-$i }"
	done
	printf '%s\n' "$objects" | sed 's/^/    | /'
	printf '%s\n' "$objects" | kc apply -f - | sed 's/^/    /'
	for ((i = 1; i <= BACKENDS; i++)); do
		# No kubelet here: the node's address and readiness are set as a
		# kubelet would.
		kc patch node "node-$i" --subresource=status --type=merge -p "{\"status\":{\"addresses\":[{\"type\":\"InternalIP\",\"address\":\"$VG_BACKEND_NET_PREFIX.$((10 + i))\"}],\"conditions\":[{\"type\":\"Ready\",\"status\":\"True\",\"reason\":\"Demo\",\"message\":\"set by the demo\",\"lastHeartbeatTime\":\"2026-01-01T00:00:00Z\",\"lastTransitionTime\":\"2026-01-01T00:00:00Z\"}]}}" >/dev/null
	done
	kc get nodes -o wide | sed 's/^/    /'

	say "k8s 3/5: starting the controller: vipgate-k8s run --cluster-name demo (log: $K8S_LOG)"
	KUBECONFIG=$K8S_DIR/kubeconfig setsid "$VIPGATE_K8S" run --cluster-name demo --metrics-addr 127.0.0.1:0 \
		</dev/null >"$K8S_LOG" 2>&1 9>&- &
	echo $! >"$K8S_PIDFILE"

	say "k8s 4/5: kubectl apply of a Service of type LoadBalancer"
	local svc
	svc=$(
		cat <<-YAML
			apiVersion: v1
			kind: Service
			metadata: { name: demo, namespace: default }
			spec:
			  type: LoadBalancer
			  loadBalancerClass: vipgate.io/gateway
			  selector: { app: demo }
			  ports:
			  - { name: http, port: 80, targetPort: $VG_HTTP_PORT, nodePort: $VG_HTTP_PORT, protocol: TCP }
			  - { name: echo, port: $VG_UDP_PORT, targetPort: $VG_UDP_PORT, nodePort: $VG_UDP_PORT, protocol: UDP }
		YAML
	)
	printf '%s\n' "$svc" | sed 's/^/    | /'
	local t0 ip="" deadline
	t0=$(now_s)
	printf '%s\n' "$svc" | kc apply -f - | sed 's/^/    /'
	deadline=$(($(date +%s) + 30))
	while [[ -z $ip ]]; do
		(($(date +%s) < deadline)) || die "the Service got no EXTERNAL-IP within 30s (see $K8S_LOG)"
		sleep 0.1
		ip=$(kc get svc demo -o 'jsonpath={.status.loadBalancer.ingress[0].ip}' 2>/dev/null || true)
	done
	say "EXTERNAL-IP $ip after $(elapsed_s "$t0")s: kubectl get svc demo"
	kc get svc demo | sed 's/^/    /'
	VG_VIP=$ip
}

# After the traffic: the Service's Events, then its deletion.
k8s_finish() {
	say "k8s 5/5: kubectl describe svc demo (its Events), then kubectl delete svc demo"
	kc describe svc demo | sed -n '/^LoadBalancer Ingress/p;/^Events:/,$p' | sed 's/^/    /'
	local t0 deadline
	t0=$(now_s)
	kc delete svc demo --wait=true --timeout=30s | sed 's/^/    /'
	deadline=$(($(date +%s) + 10))
	while "$VIPGATECTL" --socket "$SOCKET" --owner k8s/demo --json list </dev/null | grep -q '"demo\.default\.demo\.'; do
		(($(date +%s) < deadline)) || die "the gateway still serves the deleted Service after 10s"
		sleep 0.1
	done
	say "the Service is gone from the gateway $(elapsed_s "$t0")s after kubectl delete; its address is free:"
	kc get vippool demo | sed 's/^/    /'
}
