//go:build cuda

package gpu

import (
	"fmt"
	"sync"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

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

// Sample reads utilisation, memory, power and temperature of the device
// with this UUID (CUDA and NVML may number devices differently). Fields
// NVML cannot read on this device stay 0.
func Sample(uuid string) (Telemetry, error) {
	if err := start(); err != nil {
		return Telemetry{}, err
	}
	d, ret := nvml.DeviceGetHandleByUUID(uuid)
	if err := check("device "+uuid, ret); err != nil {
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
