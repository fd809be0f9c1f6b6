//go:build !cuda

package cuda

import "github.com/bmojo/bmojo/kernels"

// Built reports whether this binary contains the CUDA backend.
const Built = false

// Emulated reports whether the backend is the CPU emulation (cudaemu).
const Emulated = false

// Device is an opened GPU; in this build none can be opened.
type Device struct{}

// Visible fails: this binary has no CUDA backend.
func Visible() ([]string, error) { return nil, ErrNotBuilt }

// Open fails: this binary has no CUDA backend.
func Open(ordinal int, opt Options) (*Device, error) { return nil, ErrNotBuilt }

// Backend is never reached in this build.
func (d *Device) Backend() kernels.Backend[float32] { return nil }

// Info is never reached in this build.
func (d *Device) Info() Info { return Info{} }

// Close does nothing in this build.
func (d *Device) Close() error { return nil }

// PeakMemory is never reached in this build.
func (d *Device) PeakMemory() int64 { return 0 }

// InputCopies is never reached in this build.
func (d *Device) InputCopies() InputCopyStats { return InputCopyStats{} }

// GemmTunings is never reached in this build.
func (d *Device) GemmTunings() []GemmTuning { return nil }

// StartTiming is never reached in this build.
func (d *Device) StartTiming(bool) {}

// StopTiming is never reached in this build.
func (d *Device) StopTiming() ([]OpTime, error) { return nil, ErrNotBuilt }
