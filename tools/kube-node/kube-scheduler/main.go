// Command kube-scheduler runs upstream's kube-scheduler command (k8s.io/kubernetes/cmd/kube-scheduler/app, built
// from the Go module proxy); scripts/kube-node.sh starts it for the
// Kubernetes end-to-end test (tests/k8s).
package main

import (
	"os"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/kube-scheduler/app"
)

func main() {
	os.Exit(cli.Run(app.NewSchedulerCommand()))
}
