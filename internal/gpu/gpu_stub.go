//go:build !cuda

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

func (g GPU) String() string { return fmt.Sprintf("GPU %d: %s", g.Index, g.Name) }

// Telemetry is one sample of a device's state.
type Telemetry struct {
	UUID         string  `json:"uuid"`
	UtilPercent  float64 `json:"util_percent"`
	MemUsedBytes float64 `json:"mem_used_bytes"`
	MemTotal     float64 `json:"mem_total_bytes"`
	PowerWatts   float64 `json:"power_watts"`
	TempCelsius  float64 `json:"temp_celsius"`
}

// ErrNoDriver means NVML (and so the NVIDIA driver) is not usable.
var ErrNoDriver = errors.New("gpu: no NVIDIA driver")

var errNotBuilt = fmt.Errorf("%w: this binary was built without -tags cuda, so it does not load NVML", ErrNoDriver)

// Discover reports that this build has no GPU support.
func Discover() ([]GPU, error) { return nil, errNotBuilt }

// Sample reports that this build has no GPU support.
func Sample(index int) (Telemetry, error) { return Telemetry{}, errNotBuilt }
