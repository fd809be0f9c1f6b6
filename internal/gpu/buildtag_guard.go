//go:build cuda && !kustomize_disable_go_plugin_support

package gpu

// A GPU build must be made with
//
//	go build -tags cuda,kustomize_disable_go_plugin_support ./cmd/bmojo
//
// (make build-cuda does). go-nvml resolves NVML's symbols lazily, when the
// driver library is loaded; kustomize's Go-plugin loader makes the Go linker
// bind every symbol at start-up instead (-z now), and the binary would not
// start. The tag drops that loader, which bmojo never uses.
var _ = build_with_tags_cuda_and_kustomize_disable_go_plugin_support
