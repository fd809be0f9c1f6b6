// Command etcd is etcd's own main (go.etcd.io/etcd/server/v3/etcdmain) at
// v3.6.13, the version of the quay.io/coreos/etcd image the manifests name.
// tests/k8s packs it into an image under that name, since the node reaches
// no registry; like the official image it reads its settings from ETCD_*.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
