// Package device turns a --device flag into a kernels backend: "cpu", "cuda"
// or "cuda:N" (one GPU), or "auto" (the GPU when this binary was built with
// -tags cuda and the machine has one, else the CPU, saying why in the log).
package device

import (
	"errors"
	"fmt"
	"runtime"
	"strconv"
	"strings"

	"github.com/hashicorp/go-hclog"

	"github.com/bmojo/bmojo/internal/gpu"
	"github.com/bmojo/bmojo/kernels"
	"github.com/bmojo/bmojo/kernels/cpu"
	"github.com/bmojo/bmojo/kernels/cuda"
)

// Options configure Open. The zero value is the default everywhere.
type Options struct {
	Logger hclog.Logger // where Open says what it chose and why; nil = silent
	// NoCublasLt and NoGemmTune are cuda.Options' (benchmarks compare them).
	NoCublasLt, NoGemmTune bool
}

// Opened is a backend and what runs it.
type Opened struct {
	Backend kernels.Backend[float32]
	Kind    string // "cpu" or "cuda"
	GPU     int    // device ordinal when Kind is "cuda"
	UUID    string // the GPU's UUID when Kind is "cuda" (NVML finds it by this)
	Desc    string // for logs and membership records, e.g. "cuda:0 NVIDIA H200"
	Dev     *cuda.Device
}

// Close releases the GPU (a no-op on the CPU).
func (o *Opened) Close() error {
	if o.Dev != nil {
		return o.Dev.Close()
	}
	return nil
}

// PeakMemory is the most device memory held so far (0 on the CPU).
func (o *Opened) PeakMemory() int64 {
	if o.Dev != nil {
		return o.Dev.PeakMemory()
	}
	return 0
}

// Parse checks a device spec and returns its kind and GPU ordinal (-1 for
// auto or cpu).
func Parse(spec string) (kind string, ordinal int, err error) {
	switch {
	case spec == "" || spec == "auto":
		return "auto", -1, nil
	case spec == "cpu":
		return "cpu", -1, nil
	case spec == "cuda" || spec == "gpu":
		return "cuda", 0, nil
	case strings.HasPrefix(spec, "cuda:"):
		n, err := strconv.Atoi(strings.TrimPrefix(spec, "cuda:"))
		if err != nil || n < 0 {
			return "", 0, fmt.Errorf("device %q: want cuda:N with N a GPU index", spec)
		}
		return "cuda", n, nil
	}
	return "", 0, fmt.Errorf("device %q: want auto, cpu, cuda or cuda:N", spec)
}

// GPUs returns the GPUs this binary can use, in CUDA's order (element i is
// cuda:i): NVML's list, restricted to and ordered as the devices the CUDA
// driver shows this process (CUDA_VISIBLE_DEVICES, CUDA_DEVICE_ORDER), and
// matched by UUID. None when the binary was built without -tags cuda or
// NVML finds no driver.
func GPUs() ([]gpu.GPU, error) {
	all, err := discover()
	if err != nil || len(all) == 0 {
		return all, err
	}
	uuids, err := cuda.Visible()
	if err != nil {
		return nil, err
	}
	return cudaOrder(all, uuids)
}

// cudaOrder returns the GPUs of all whose UUIDs are in uuids, in that order.
func cudaOrder(all []gpu.GPU, uuids []string) ([]gpu.GPU, error) {
	byUUID := map[string]gpu.GPU{}
	for _, g := range all {
		byUUID[g.UUID] = g
	}
	out := make([]gpu.GPU, 0, len(uuids))
	for i, u := range uuids {
		g, ok := byUUID[u]
		if !ok {
			return nil, fmt.Errorf("gpu: CUDA device %d (%s) is not among the %d NVML lists", i, u, len(all))
		}
		out = append(out, g)
	}
	return out, nil
}

// discover is NVML's list of the machine's GPUs.
func discover() ([]gpu.GPU, error) {
	if !cuda.Built {
		return nil, cuda.ErrNotBuilt
	}
	return gpu.Discover()
}

// Open returns the backend for spec.
func Open(spec string, o Options) (*Opened, error) {
	kind, ordinal, err := Parse(spec)
	if err != nil {
		return nil, err
	}
	log := o.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	if kind == "auto" {
		gpus, err := GPUs()
		switch {
		case errors.Is(err, cuda.ErrNotBuilt):
			log.Info("using the CPU backend: this binary was built without -tags cuda")
			kind = "cpu"
		case err != nil:
			log.Info("using the CPU backend: no usable GPU", "reason", err)
			kind = "cpu"
		case len(gpus) == 0:
			log.Info("using the CPU backend: the NVIDIA driver lists no GPU")
			kind = "cpu"
		default:
			kind, ordinal = "cuda", 0
		}
	}
	if kind == "cpu" {
		return &Opened{Backend: cpu.New[float32](), Kind: "cpu", GPU: -1,
			Desc: fmt.Sprintf("cpu (%d threads)", runtime.GOMAXPROCS(0))}, nil
	}
	opt := cuda.Options{MatMul: "bf16", NoCublasLt: o.NoCublasLt, NoGemmTune: o.NoGemmTune}
	d, err := cuda.Open(ordinal, opt)
	if err != nil {
		return nil, err
	}
	i := d.Info()
	op := &Opened{Backend: d.Backend(), Kind: "cuda", GPU: ordinal, UUID: i.UUID, Dev: d,
		Desc: fmt.Sprintf("cuda:%d %s", ordinal, i.Name)}
	log.Info("using the GPU", "device", op.Desc, "memory_gib", fmt.Sprintf("%.1f", float64(i.MemTotal)/(1<<30)),
		"sm", fmt.Sprintf("%d.%d", i.ComputeMajor, i.ComputeMinor), "matmul", opt.MatMul, "cublas", i.CuBLAS)
	return op, nil
}

// CPU returns the CPU backend.
func CPU() kernels.Backend[float32] { return cpu.New[float32]() }
