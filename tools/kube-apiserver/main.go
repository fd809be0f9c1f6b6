// Command kube-apiserver is upstream's cmd/kube-apiserver main, copied so this
// module can build it with `go build .`; the launch tests run it against an
// embedded etcd (see internal/launch and scripts/kube-apiserver.sh).
package main

import (
	"os"
	_ "time/tzdata" // CronJob time zones, as upstream

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {
	os.Exit(cli.Run(app.NewAPIServerCommand()))
}
