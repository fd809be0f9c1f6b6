// Package gpu discovers NVIDIA GPUs and samples their telemetry through NVML
// (github.com/NVIDIA/go-nvml), in binaries built with -tags cuda (gpu.go;
// without the tag, gpu_stub.go reports ErrNoDriver). It needs no CUDA
// toolkit: NVML is loaded from the driver at run time, so a machine without a
// driver gets a clear error and every caller falls back to the CPU.
package gpu

import (
	"errors"
	"fmt"
)

// GPU describes one device as NVML reports it.
type GPU struct {
	Index    int    `json:"index"`
	Name     string `json:"name"`
	UUID     string `json:"uuid"`
	MemTotal uint64 `json:"mem_total_bytes"`
	MemFree  uint64 `json:"mem_free_bytes"`
	Driver   string `json:"driver"`
}

func (g GPU) String() string {
	return fmt.Sprintf("GPU %d: %s, %.1f GiB (%.1f GiB free), %s", g.Index, g.Name,
		float64(g.MemTotal)/(1<<30), float64(g.MemFree)/(1<<30), g.UUID)
}

// Telemetry is one sample of a device's state. Workers report it as
// job.GPUStats (the wire format), a conversion of this type.
type Telemetry struct {
	UUID         string
	UtilPercent  float64
	MemUsedBytes float64
	MemTotal     float64
	PowerWatts   float64
	TempCelsius  float64
}

// ErrNoDriver means NVML (and so the NVIDIA driver) is not usable, or this
// binary was built without -tags cuda and does not load it.
var ErrNoDriver = errors.New("gpu: no NVIDIA driver")
