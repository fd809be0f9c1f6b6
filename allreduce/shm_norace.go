//go:build !race

package allreduce

import "unsafe"

// See shm_race.go.

func shmRaceToken(uint64, int) unsafe.Pointer { return nil }

func (q *shmQueue) raceRelease() {}
func (q *shmQueue) raceAcquire() {}

const raceEnabled = false
