//go:build cuda

package worker

import (
	"testing"

	"github.com/bmojo/bmojo/allreduce"
	"github.com/bmojo/bmojo/kernels"
	"github.com/bmojo/bmojo/kernels/cuda"
)

// openShared opens one device for the test's replicas (a backend each):
// the emulation runs kernels on global state, so two devices of one
// process must not launch at once.
func openShared(t *testing.T) func(int) kernels.Backend[float32] {
	d, err := cuda.Open(0, cuda.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Close() })
	return func(int) kernels.Backend[float32] { return d.Backend() }
}

// TestReducerPathsBitIdenticalCUDA is TestReducerPathsBitIdentical on the
// CUDA backend (the emulation with cudaemu), where the overlapped path
// copies on the copy stream and waits on the waiter thread: both paths
// leave the bits of the CPU backend's reference (the sums are made on the
// host either way).
func TestReducerPathsBitIdenticalCUDA(t *testing.T) {
	gpu := openShared(t)
	checkReducerPaths(t, []reducerPath{
		{"cpu sync", true, cpuBackend},
		{"cuda sync", true, gpu},
		{"cuda overlapped", false, gpu},
	})
}

// TestTrainStepOverlapBitIdenticalCUDA is TestTrainStepOverlapBitIdentical
// on the CUDA backend: bit for bit on the emulation. On a real GPU float
// atomics make backward differ from run to run in its last bits, so there
// the ranks of each path are held to each other within 1e-6 (the clipping
// factor may differ by an ulp); TestReducerPathsBitIdenticalCUDA holds the
// reduction itself to the bits of the reference.
func TestTrainStepOverlapBitIdenticalCUDA(t *testing.T) {
	tol := 1e-6
	if cuda.Emulated {
		tol = 0
	}
	checkTrainStepPaths(t, openShared(t), tol)
}

// ipcRing configures rank's ring as a worker's GPU ring: cuda-ipc hops on
// the backend's communication stream (commDevice).
func ipcRing(t *testing.T, gpu func(int) kernels.Backend[float32]) func(int, *allreduce.Config) {
	return func(rank int, cfg *allreduce.Config) {
		dm, ok := commDevice(gpu(rank))
		if !ok {
			t.Fatal("the CUDA backend is not an allreduce.DeviceMem")
		}
		cfg.Transport, cfg.Device = allreduce.TransportCUDAIPC, dm
	}
}

// TestReducerDevicePathCUDA: over a ring whose same-host hops carry device
// slots (cuda-ipc), the reducer keeps the gradients on the device
// (allreduce.Ring.DeviceNative) and its sums have the bits of the CPU
// reference's host path. In one process the driver refuses to open a
// handle the process exported, so each hop's sender writes the host slot
// and the receiver reduces on the device (the two-process path, device to
// device, is kernels/cuda's TestIPCRingTwoProcesses).
func TestReducerDevicePathCUDA(t *testing.T) {
	gpu := openShared(t)
	var rings []*allreduce.Ring
	runReducerPaths(t, func(p reducerPath) []*allreduce.Ring {
		if p.name == "cpu sync" {
			return testRings(t, 2, allreduce.TransportAuto)
		}
		rings = testRingsWith(t, 2, ipcRing(t, gpu))
		return rings
	}, []reducerPath{
		{"cpu sync", true, cpuBackend},
		{"cuda device", true, gpu},
	})
	for i, r := range rings {
		if !r.DeviceNative() {
			t.Errorf("rank %d: the cuda-ipc ring did not reduce on the device", i)
		}
	}
}

// TestReducerDeviceHierCUDA is TestReducerDevicePathCUDA for a hierarchy
// of one host with both ranks on it (each rank's ring across hosts has
// only itself): the reduce-scatter and all-gather inside the host run on
// the device, each rank's segment through host memory, and the sums have
// the bits of the CPU reference's flat host ring.
func TestReducerDeviceHierCUDA(t *testing.T) {
	gpu := openShared(t)
	var hs []*allreduce.Hier
	runReducerPaths(t, func(p reducerPath) []allreduce.Collective {
		if p.name == "cpu sync" {
			rs := testRings(t, 2, allreduce.TransportAuto)
			return []allreduce.Collective{rs[0], rs[1]}
		}
		local := testRingsWith(t, 2, ipcRing(t, gpu))
		hs = []*allreduce.Hier{
			{Local: local[0], Cross: testRings(t, 1, allreduce.TransportGRPC)[0]},
			{Local: local[1], Cross: testRings(t, 1, allreduce.TransportGRPC)[0]},
		}
		return []allreduce.Collective{hs[0], hs[1]}
	}, []reducerPath{
		{"cpu sync", true, cpuBackend},
		{"cuda device hier", true, gpu},
	})
	for i, h := range hs {
		if !h.DeviceNative() {
			t.Errorf("rank %d: the hierarchy did not reduce on the device", i)
		}
	}
}
