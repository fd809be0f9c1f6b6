//go:build cuda

// Package gpu discovers NVIDIA GPUs and samples their telemetry through NVML
// (github.com/NVIDIA/go-nvml). It needs no CUDA toolkit: NVML is loaded from
// the driver at run time, so a machine without a driver gets a clear error
// and every caller falls back to the CPU.
package gpu

import (
	"errors"
	"fmt"
	"sync"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
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

// Telemetry is one sample of a device's state.
type Telemetry struct {
	UUID         string  `json:"uuid"`
	UtilPercent  float64 `json:"util_percent"`
	MemUsedBytes float64 `json:"mem_used_bytes"`
	MemTotal     float64 `json:"mem_total_bytes"`
	PowerWatts   float64 `json:"power_watts"`
	TempCelsius  float64 `json:"temp_celsius"`
}

// ErrNoDriver means NVML (and so the NVIDIA driver) is not installed.
var ErrNoDriver = errors.New("gpu: no NVIDIA driver")

// Tags is the build tags of a GPU binary (see buildtag_guard.go).
const Tags = "cuda,kustomize_disable_go_plugin_support"

var (
	initOnce sync.Once
	initErr  error
)

func start() error {
	initOnce.Do(func() {
		defer func() {
			// go-nvml panics when the library cannot be loaded on some
			// versions; report it as "no driver".
			if r := recover(); r != nil {
				initErr = fmt.Errorf("%w: %v", ErrNoDriver, r)
			}
		}()
		if ret := nvml.Init(); ret != nvml.SUCCESS {
			if ret == nvml.ERROR_LIBRARY_NOT_FOUND || ret == nvml.ERROR_DRIVER_NOT_LOADED {
				initErr = fmt.Errorf("%w: %s", ErrNoDriver, nvml.ErrorString(ret))
				return
			}
			initErr = fmt.Errorf("gpu: NVML init: %s", nvml.ErrorString(ret))
		}
	})
	return initErr
}

func check(what string, ret nvml.Return) error {
	if ret == nvml.SUCCESS {
		return nil
	}
	return fmt.Errorf("gpu: %s: %s", what, nvml.ErrorString(ret))
}

// Discover lists the GPUs of this machine. With no driver it returns
// ErrNoDriver; with a driver and no GPU an empty list.
func Discover() ([]GPU, error) {
	if err := start(); err != nil {
		return nil, err
	}
	n, ret := nvml.DeviceGetCount()
	if err := check("device count", ret); err != nil {
		return nil, err
	}
	driver, _ := nvml.SystemGetDriverVersion()
	var out []GPU
	for i := 0; i < n; i++ {
		d, ret := nvml.DeviceGetHandleByIndex(i)
		if err := check(fmt.Sprintf("device %d", i), ret); err != nil {
			return nil, err
		}
		g := GPU{Index: i, Driver: driver}
		g.Name, _ = d.GetName()
		g.UUID, _ = d.GetUUID()
		if m, ret := d.GetMemoryInfo(); ret == nvml.SUCCESS {
			g.MemTotal, g.MemFree = m.Total, m.Free
		}
		out = append(out, g)
	}
	return out, nil
}

// Sample reads utilisation, memory, power and temperature of device index.
// Fields NVML cannot read on this device stay 0.
func Sample(index int) (Telemetry, error) {
	if err := start(); err != nil {
		return Telemetry{}, err
	}
	d, ret := nvml.DeviceGetHandleByIndex(index)
	if err := check(fmt.Sprintf("device %d", index), ret); err != nil {
		return Telemetry{}, err
	}
	var t Telemetry
	t.UUID, _ = d.GetUUID()
	if u, ret := d.GetUtilizationRates(); ret == nvml.SUCCESS {
		t.UtilPercent = float64(u.Gpu)
	}
	if m, ret := d.GetMemoryInfo(); ret == nvml.SUCCESS {
		t.MemUsedBytes, t.MemTotal = float64(m.Used), float64(m.Total)
	}
	if p, ret := d.GetPowerUsage(); ret == nvml.SUCCESS {
		t.PowerWatts = float64(p) / 1000
	}
	if c, ret := d.GetTemperature(nvml.TEMPERATURE_GPU); ret == nvml.SUCCESS {
		t.TempCelsius = float64(c)
	}
	return t, nil
}
