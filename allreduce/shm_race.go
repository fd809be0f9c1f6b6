//go:build race

package allreduce

import (
	"runtime"
	"sync"
	"unsafe"
)

// The race detector does not see synchronisation through memory outside the
// Go heap, such as the shared-memory counters, so in-process tests of the
// same-host path would report the ring's own hand-offs (a chunk sent, then
// the same elements overwritten when their reduced value comes back around
// the ring) as races. Under -race each queue therefore also releases and
// acquires a heap token shared by both ends (keyed by the file's nonce),
// telling the detector what the head and tail stores already order.
//
// Across processes no token can help: TestKillRank's shared-memory variant,
// whose ring runs through a child process, is skipped under -race.
var shmRaceTokens sync.Map // shmRaceKey → *uint64

type shmRaceKey struct {
	nonce uint64
	queue int
}

func shmRaceToken(nonce uint64, q int) unsafe.Pointer {
	v, _ := shmRaceTokens.LoadOrStore(shmRaceKey{nonce, q}, new(uint64))
	return unsafe.Pointer(v.(*uint64))
}

func (q *shmQueue) raceRelease() { runtime.RaceReleaseMerge(q.raceTok) }
func (q *shmQueue) raceAcquire() { runtime.RaceAcquire(q.raceTok) }

const raceEnabled = true
