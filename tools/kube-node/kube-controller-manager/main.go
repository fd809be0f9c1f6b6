// Command kube-controller-manager runs upstream's kube-controller-manager command (k8s.io/kubernetes/cmd/kube-controller-manager/app, built
// from the Go module proxy); scripts/kube-node.sh starts it for the
// Kubernetes end-to-end test (tests/k8s), where its Job controller runs
// the Indexed worker Job.
package main

import (
	"os"
	_ "time/tzdata" // CronJob time zones, as upstream

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/kube-controller-manager/app"
)

func main() {
	os.Exit(cli.Run(app.NewControllerManagerCommand()))
}
