//go:build !linux

package allreduce

import (
	"errors"
	"time"
)

// The same-host path needs Linux (the boot id names the host); elsewhere
// every hop uses gRPC.

var hostIdentity = func() string { return "" }

var errNoShm = errors.New("shared-memory transport needs Linux")

func createShmRegion(shmGeometry, uint64, int, int) (*shmRegion, error) { return nil, errNoShm }

func openShmRegion(string, uint64, uint64, int, int) (*shmRegion, error) { return nil, errNoShm }

func (s *shmRegion) unlink() {}
func (s *shmRegion) unmap()  {}

func nanosleep(d time.Duration) { time.Sleep(d) }
