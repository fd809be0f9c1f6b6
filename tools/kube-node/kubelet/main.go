// Command kubelet runs upstream's kubelet command (k8s.io/kubernetes/cmd/kubelet/app, built
// from the Go module proxy); scripts/kube-node.sh starts it for the
// Kubernetes end-to-end test (tests/k8s).
package main

import (
	"context"
	"os"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/kubelet/app"
)

func main() {
	os.Exit(cli.Run(app.NewKubeletCommand(context.Background())))
}
