// Package k8s holds bmojo's Kubernetes manifests: a kustomize base and the
// overlays cpu-demo and gpu. The YAML is the source of truth for both
// `kubectl apply -k k8s/overlays/NAME` and `bmojo launch`, which embeds this
// tree (go:embed cannot reach a parent directory, hence this package) and
// renders it with the kustomize library. No Go code here interprets it.
package k8s

import "embed"

// FS is the base and overlays, rooted at this directory
// (base/..., overlays/cpu-demo/..., overlays/gpu/...).
//
//go:embed base overlays
var FS embed.FS

// Overlays are the overlay directory names under overlays/, in the order
// documentation and CI list them.
var Overlays = []string{"cpu-demo", "gpu"}
