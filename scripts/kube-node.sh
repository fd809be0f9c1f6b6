#!/usr/bin/env bash
# A one-node Kubernetes v1.37.2 cluster on this machine, with no registry and
# no internet, for the end-to-end test (tests/k8s) and for trying a launch by
# hand. Needs root, Debian's containerd, runc and containernetworking-plugins.
#
#   scripts/kube-node.sh build            build and cache the binaries; prints their directory
#   scripts/kube-node.sh start DIR        start the cluster; prints DIR/kubeconfig
#   scripts/kube-node.sh image DIR BIN TAG  pack a static binary as image TAG (entrypoint
#                                         /usr/local/bin/bmojo, user 65532) and import it
#   scripts/kube-node.sh stop DIR         stop everything start started, remove pods' mounts,
#                                         network namespaces, the bridge and the cgroups, and
#                                         put back the kernel settings the kubelet changed
#
# The cluster: etcd and kube-apiserver from scripts/kube-apiserver.sh;
# kube-controller-manager, kube-scheduler and the kubelet built from the Go
# module proxy (tools/kube-node); Debian's containerd 1.6 with runc and the
# overlayfs snapshotter; Debian's CNI bridge and host-local plugins on the
# bridge bmojo0 (10.244.0.0/24, the node's IP 10.244.0.1); node-dns
# (tools/kube-node/node-dns) as the cluster DNS on 10.244.0.1:53, answering
# Service and pod names from the API server, as CoreDNS would; no kube-proxy,
# so ClusterIPs do not route (pods reach each other by pod IP and DNS names).
# Images come from tools/kube-images: the pause (sandbox) image, and etcd
# v3.6.13 built from source under the name the manifests use
# (quay.io/coreos/etcd:v3.6.13). Every component authenticates with one
# admin token (system:masters); this is a throwaway test cluster.
#
# Binaries are cached like scripts/kube-apiserver.sh's, in
# ${BMOJO_CACHE_DIR:-~/.cache/bmojo}/kube-node-v1.37.2, rebuilt when
# tools/kube-node or tools/kube-images change: 14 minutes on two busy cores
# with an empty Go build cache, much less after kube-apiserver's build, which
# shares most packages. Every wait has a deadline; start stops what it
# started when it fails.
set -Eeuo pipefail
cd "$(dirname "$0")/.."

version=v1.37.2
etcd_version=v3.6.13
cache="${BMOJO_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/bmojo}/kube-node-$version"
bridge=bmojo0
gateway=10.244.0.1
subnet=10.244.0.0/24
node=bmojo-node
api_port=16443
etcd_port=23790
dns_domain=cluster.local
kernel_tunables="vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes"

die() { echo "kube-node: $*" >&2; exit 1; }
say() { echo "kube-node: $*" >&2; }

# build: every binary the node runs, built once into $cache.
build() {
	local bins=(kubelet kube-controller-manager kube-scheduler node-dns oci-image pause etcd)
	local missing=0 stamp
	for b in "${bins[@]}"; do
		[ -x "$cache/$b" ] || missing=1
	done
	# The sources' hash: a changed tool (node-dns, oci-image) is rebuilt.
	stamp="$(find tools/kube-node tools/kube-images -type f \( -name '*.go' -o -name go.mod -o -name go.sum \) -print0 |
		sort -z | xargs -0 sha256sum | sha256sum | cut -c1-64)"
	if [ "$missing" = 1 ] || [ "$(cat "$cache/sources.sha256" 2>/dev/null)" != "$stamp" ] ||
		[[ "$("$cache/kubelet" --version 2>/dev/null)" != *"$version" ]]; then
		mkdir -p "$cache"
		say "building kubelet, kube-controller-manager, kube-scheduler $version and the node's tools into $cache (up to 14 minutes on 2 cores)"
		local ld="-X k8s.io/component-base/version.gitVersion=$version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=37"
		local start=$SECONDS
		# Temporary names, renamed when all are built: an interrupted build
		# never leaves a half-written binary the check above would take.
		for b in kubelet kube-controller-manager kube-scheduler node-dns; do
			(cd tools/kube-node && CGO_ENABLED=0 go build -trimpath -ldflags "$ld" -o "$cache/$b.tmp" "./$b")
		done
		for b in oci-image pause etcd; do
			(cd tools/kube-images && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$cache/$b.tmp" "./$b")
		done
		for b in "${bins[@]}"; do
			mv "$cache/$b.tmp" "$cache/$b"
		done
		echo "$stamp" >"$cache/sources.sha256"
		say "built in $((SECONDS - start)) s"
	fi
	echo "$cache"
}

# wait_for SECONDS WHAT COMMAND...: poll every half second until COMMAND
# succeeds; fails naming WHAT after SECONDS.
wait_for() {
	local secs=$1 what=$2
	shift 2
	local deadline=$((SECONDS + secs))
	until "$@" >/dev/null 2>&1; do
		[ "$SECONDS" -lt "$deadline" ] || { say "$what: not after ${secs}s"; return 1; }
		sleep 0.5
	done
}

# run_bg DIR NAME CMD...: start CMD in the background, output in
# DIR/logs/NAME.log, pid in DIR/pids/NAME.
run_bg() {
	local dir=$1 name=$2
	shift 2
	setsid "$@" >"$dir/logs/$name.log" 2>&1 </dev/null &
	echo $! >"$dir/pids/$name"
}

alive() { kill -0 "$(cat "$1/pids/$2")" 2>/dev/null; }

api() { curl -sf --max-time 5 --cacert "$dir/pki/ca.crt" -H "Authorization: Bearer $(cat "$dir/pki/token")" "https://127.0.0.1:$api_port$1"; }

node_ready() {
	api "/api/v1/nodes/$node" | jq -e '.status.conditions[] | select(.type == "Ready" and .status == "True")'
}

start() {
	dir=$1
	[ "$(id -u)" = 0 ] || die "start needs root (containerd, runc, network namespaces, cgroups)"
	for c in containerd runc ctr ip openssl curl jq setsid; do
		command -v "$c" >/dev/null || die "no $c: apt-get install containerd runc containernetworking-plugins iproute2 openssl curl jq"
	done
	for p in bridge host-local loopback; do
		[ -x "/usr/lib/cni/$p" ] || die "no CNI plugin /usr/lib/cni/$p: apt-get install containernetworking-plugins"
	done
	[ ! -e "$dir/pids" ] || [ -z "$(ls -A "$dir/pids")" ] || die "$dir has a running node: scripts/kube-node.sh stop $dir"
	ip link show "$bridge" >/dev/null 2>&1 && die "bridge $bridge exists: another node runs here (scripts/kube-node.sh stop DIR)"
	local bin apiserver
	bin="$(build)"
	apiserver="$(scripts/kube-apiserver.sh)"
	mkdir -p "$dir"/{logs,pids,pki,cni/net.d,cni/ipam,containerd,kubelet,etcd,images}
	dir="$(cd "$dir" && pwd)"
	trap 'trap - ERR; say "start failed; stopping what it started"; stop "$dir"' ERR

	# Credentials: a CA for the API server's serving certificate, the
	# service-account signing key, one admin token.
	(
		cd "$dir/pki"
		openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=bmojo-kube-node-ca 2>/dev/null
		openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj /CN=kube-apiserver 2>/dev/null
		printf 'subjectAltName=IP:127.0.0.1,IP:10.96.0.1,IP:%s,DNS:localhost,DNS:kubernetes.default.svc\n' "$gateway" >san.ext
		openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt -days 2 -extfile san.ext 2>/dev/null
		# The API server's client certificate for the kubelet (logs, exec).
		openssl req -newkey rsa:2048 -nodes -keyout kubelet-client.key -out kubelet-client.csr -subj "/CN=kube-apiserver-kubelet-client/O=system:masters" 2>/dev/null
		openssl x509 -req -in kubelet-client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out kubelet-client.crt -days 2 2>/dev/null
		openssl genrsa -out sa.key 2048 2>/dev/null
		openssl rand -hex 24 >token
		printf '%s,admin,uid-admin,"system:masters"\n' "$(cat token)" >tokens.csv
		chmod 600 ./*.key token tokens.csv
	)
	cat >"$dir/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: $node
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority-data: $(base64 -w0 "$dir/pki/ca.crt")
users:
- name: admin
  user:
    token: $(cat "$dir/pki/token")
contexts:
- name: $node
  context: {cluster: $node, user: admin}
current-context: $node
EOF
	chmod 600 "$dir/kubeconfig"

	# The pod network: the bridge exists before containerd (node-dns listens
	# on its address); CNI's bridge plugin adopts it. No masquerading: pods
	# talk to each other and to the node only.
	ip link add "$bridge" type bridge
	ip addr add "$gateway/24" dev "$bridge"
	ip link set "$bridge" up
	cat >"$dir/cni/net.d/10-bmojo.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "bmojo",
  "plugins": [
    {"type": "bridge", "bridge": "$bridge", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "$dir/cni/ipam", "ranges": [[{"subnet": "$subnet", "gateway": "$gateway"}]],
              "routes": [{"dst": "0.0.0.0/0"}]}}
  ]
}
EOF

	cat >"$dir/containerd/config.toml" <<EOF
version = 2
root = "$dir/containerd/root"
state = "$dir/containerd/state"
[grpc]
  address = "$dir/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "bmojo.local/pause:$version"
  # Sandboxes ask for oom_score_adj -998 and Guaranteed pods for -997;
  # lowering it needs CAP_SYS_RESOURCE, which this machine's root (a
  # Firecracker VM's) lacks, so runc's init fails. Clamp to containerd's own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$dir/cni/net.d"
EOF
	run_bg "$dir" containerd containerd --config "$dir/containerd/config.toml"
	wait_for 30 "containerd's socket" ctr -a "$dir/containerd/containerd.sock" version
	"$bin/oci-image" -tag "bmojo.local/pause:$version" -entrypoint /pause -user 65535:65535 \
		-add "/pause=$bin/pause" -o "$dir/images/pause.tar" 2>>"$dir/logs/images.log"
	"$bin/oci-image" -tag "quay.io/coreos/etcd:$etcd_version" -entrypoint /usr/local/bin/etcd \
		-add "/usr/local/bin/etcd=$bin/etcd" -o "$dir/images/etcd.tar" 2>>"$dir/logs/images.log"
	for t in pause etcd; do
		ctr -a "$dir/containerd/containerd.sock" -n k8s.io images import "$dir/images/$t.tar" >>"$dir/logs/images.log"
	done

	run_bg "$dir" etcd "$(dirname "$apiserver")/etcd" --data-dir "$dir/etcd" \
		--listen-client-url "http://127.0.0.1:$etcd_port" --listen-peer-url "http://127.0.0.1:$((etcd_port + 10))"
	run_bg "$dir" kube-apiserver "$apiserver" \
		--etcd-servers "http://127.0.0.1:$etcd_port" \
		--bind-address 127.0.0.1 --advertise-address "$gateway" --secure-port "$api_port" \
		--tls-cert-file "$dir/pki/apiserver.crt" --tls-private-key-file "$dir/pki/apiserver.key" \
		--client-ca-file "$dir/pki/ca.crt" --token-auth-file "$dir/pki/tokens.csv" \
		--kubelet-client-certificate "$dir/pki/kubelet-client.crt" --kubelet-client-key "$dir/pki/kubelet-client.key" \
		--authorization-mode RBAC \
		--service-account-issuer https://kubernetes.default.svc \
		--service-account-key-file "$dir/pki/sa.key" --service-account-signing-key-file "$dir/pki/sa.key" \
		--service-cluster-ip-range 10.96.0.0/24 --endpoint-reconciler-type none \
		--enable-priority-and-fairness=false
	wait_for 120 "kube-apiserver /readyz" api /readyz

	run_bg "$dir" kube-controller-manager "$bin/kube-controller-manager" \
		--kubeconfig "$dir/kubeconfig" --authentication-kubeconfig "$dir/kubeconfig" --authorization-kubeconfig "$dir/kubeconfig" \
		--bind-address 127.0.0.1 --leader-elect=false --controllers '*' \
		--service-account-private-key-file "$dir/pki/sa.key" --root-ca-file "$dir/pki/ca.crt" \
		--service-cluster-ip-range 10.96.0.0/24 --allocate-node-cidrs=false
	run_bg "$dir" kube-scheduler "$bin/kube-scheduler" \
		--kubeconfig "$dir/kubeconfig" --authentication-kubeconfig "$dir/kubeconfig" --authorization-kubeconfig "$dir/kubeconfig" \
		--bind-address 127.0.0.1 --leader-elect=false
	run_bg "$dir" node-dns "$bin/node-dns" -kubeconfig "$dir/kubeconfig" -listen "$gateway:53" -domain "$dns_domain"

	cat >"$dir/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: "$dir/pki/ca.crt"}
authorization: {mode: AlwaysAllow}
# The API server reaches the kubelet (logs, exec) at the node IP with its
# client certificate; nothing else is let in.
address: $gateway
healthzBindAddress: 127.0.0.1
podLogsDir: $dir/kubelet/pod-logs
readOnlyPort: 0
containerRuntimeEndpoint: unix://$dir/containerd/containerd.sock
cgroupDriver: cgroupfs
# This machine (and CI's) mounts cgroup v1 hierarchies; kubelet v1.37 still
# runs on them when told to.
failCgroupV1: false
failSwapOn: false
clusterDNS: ["$gateway"]
clusterDomain: $dns_domain
resolvConf: ""
hairpinMode: hairpin-veth
maxPods: 30
serializeImagePulls: false
# The imported images are the only copies: never garbage-collect them, and
# never evict for a disk that is merely busy.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
EOF
	# The kubelet sets these kernel settings for its own protection
	# (panic on oops, overcommit, key quotas); stop puts them back.
	for k in $kernel_tunables; do
		echo "$k=$(sysctl -n "$k")"
	done >"$dir/sysctl.saved"
	run_bg "$dir" kubelet "$bin/kubelet" --config "$dir/kubelet/config.yaml" --kubeconfig "$dir/kubeconfig" \
		--root-dir "$dir/kubelet/root" --cert-dir "$dir/kubelet/pki" \
		--hostname-override "$node" --node-ip "$gateway"
	wait_for 120 "node $node Ready" node_ready
	for c in containerd etcd kube-apiserver kube-controller-manager kube-scheduler node-dns kubelet; do
		alive "$dir" "$c" || { say "$c exited: $(tail -5 "$dir/logs/$c.log")"; false; }
	done
	trap - ERR
	say "node $node ready; kubeconfig $dir/kubeconfig, logs in $dir/logs"
	echo "$dir/kubeconfig"
}

image() {
	local dir=$1 bin=$2 tag=$3 cachebin
	cachebin="$(build)"
	"$cachebin/oci-image" -tag "$tag" -entrypoint /usr/local/bin/bmojo -user 65532:65532 \
		-add "/usr/local/bin/bmojo=$bin" -o "$dir/images/bmojo.tar" 2>>"$dir/logs/images.log"
	ctr -a "$dir/containerd/containerd.sock" -n k8s.io images import "$dir/images/bmojo.tar" >>"$dir/logs/images.log"
}

# kill_pid DIR NAME: SIGTERM, then SIGKILL after 10 s, a process start started.
kill_pid() {
	local f="$1/pids/$2" pid
	[ -f "$f" ] || return 0
	pid="$(cat "$f")"
	if kill -TERM "$pid" 2>/dev/null; then
		for _ in $(seq 20); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.5
		done
		kill -KILL "$pid" 2>/dev/null || true
	fi
	rm -f "$f"
}

stop() {
	local dir=$1
	[ -d "$dir" ] || die "no node directory $dir"
	dir="$(cd "$dir" && pwd)"
	local sock="$dir/containerd/containerd.sock"
	kill_pid "$dir" kubelet
	if [ -f "$dir/sysctl.saved" ]; then
		sysctl -q -w $(cat "$dir/sysctl.saved") || say "could not restore the kernel settings in $dir/sysctl.saved"
		rm -f "$dir/sysctl.saved"
	fi
	# The pods' containers: kill and delete every task and container in the
	# CRI namespace of this node's containerd (their shims then exit).
	local ids=() c
	if [ -S "$sock" ] && ctr -a "$sock" version >/dev/null 2>&1; then
		mapfile -t ids < <(ctr -a "$sock" -n k8s.io containers ls -q 2>/dev/null)
		for c in $(ctr -a "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
			timeout 10 ctr -a "$sock" -n k8s.io tasks kill -s SIGKILL "$c" >/dev/null 2>&1 || true
		done
		for c in $(ctr -a "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
			timeout 10 ctr -a "$sock" -n k8s.io tasks delete -f "$c" >/dev/null 2>&1 || true
		done
		for c in $(ctr -a "$sock" -n k8s.io containers ls -q 2>/dev/null); do
			timeout 10 ctr -a "$sock" -n k8s.io containers delete "$c" >/dev/null 2>&1 || true
		done
	fi
	for c in node-dns kube-scheduler kube-controller-manager kube-apiserver etcd containerd; do
		kill_pid "$dir" "$c"
	done
	# Shims left behind (their containers were gone): only this node's,
	# found by the containerd address on their command line.
	local p
	for p in /proc/[0-9]*; do
		local cmdline
		cmdline="$(tr '\0' ' ' 2>/dev/null <"$p/cmdline")" || continue
		if [[ "$cmdline" == *"-address $sock "* ]]; then
			kill -KILL "${p#/proc/}" 2>/dev/null || true
		fi
	done
	# The pods' network namespaces (containerd names them cni-<uuid>; this
	# node's are those whose veth is on its bridge, gone with the bridge) and
	# its mounts: secret tmpfs, projected volumes, overlay rootfs.
	if [ -d /var/run/netns ]; then
		for p in /var/run/netns/cni-*; do
			[ -e "$p" ] || continue
			local routes
			routes="$(ip netns exec "${p##*/}" ip route 2>/dev/null || true)"
			if [[ "$routes" == *"via $gateway "* ]]; then
				umount "$p" 2>/dev/null || true
				rm -f "$p"
			fi
		done
	fi
	ip link del "$bridge" 2>/dev/null || true
	grep -o " $dir/[^ ]*" /proc/mounts | sort -r | while read -r m; do
		umount -l "$m" 2>/dev/null || true
	done
	# The kubelet's cgroups (kubepods), leaf first, in every hierarchy.
	for h in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods /sys/fs/cgroup/*/k8s.io; do
		[ -d "$h" ] && find "$h" -depth -type d -exec rmdir {} + 2>/dev/null || true
	done
	# What the kubelet and CNI keep outside DIR: the log symlinks of its
	# containers and the CNI result cache of its sandboxes.
	find /var/log/containers -maxdepth 1 -lname "$dir/*" -delete 2>/dev/null || true
	for c in "${ids[@]}"; do
		rm -f /var/lib/cni/results/*-"$c"-* 2>/dev/null || true
	done
	find /run/containerd -depth -type d -empty -delete 2>/dev/null || true
	rm -rf "$dir/pids"
	say "stopped; logs kept in $dir/logs"
}

case "${1:-}" in
build) build ;;
start) [ $# = 2 ] || die "usage: $0 start DIR"; start "$2" ;;
image) [ $# = 4 ] || die "usage: $0 image DIR BINARY TAG"; image "$2" "$3" "$4" ;;
stop) [ $# = 2 ] || die "usage: $0 stop DIR"; stop "$2" ;;
*) die "usage: $0 build | start DIR | image DIR BINARY TAG | stop DIR" ;;
esac
