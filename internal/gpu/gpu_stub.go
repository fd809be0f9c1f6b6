//go:build !cuda

package gpu

import "fmt"

var errNotBuilt = fmt.Errorf("%w: this binary was built without -tags cuda, so it does not load NVML", ErrNoDriver)

// Discover reports that this build has no GPU support.
func Discover() ([]GPU, error) { return nil, errNotBuilt }

// Sample reports that this build has no GPU support.
func Sample(uuid string) (Telemetry, error) { return Telemetry{}, errNotBuilt }
