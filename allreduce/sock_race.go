//go:build race

package allreduce

import (
	"runtime"
	"sync"
	"unsafe"
)

// The race detector learns of synchronisation through a socket from the
// annotations in syscall.Read and syscall.Write, but writev (how a data
// socket sends a chunk) has none, so in-process tests of the socket path
// would report the ring's own hand-offs (a chunk sent, then the same
// elements overwritten when their reduced value comes back around the
// ring) as races. Under -race each data socket therefore also releases and
// acquires a heap token shared by both ends (keyed by the offer's nonce).
var sockRaceTokens sync.Map // sockRaceKey → *uint64

type sockRaceKey struct {
	nonce string
	sock  int
}

func sockRaceToken(nonce []byte, k int) unsafe.Pointer {
	v, _ := sockRaceTokens.LoadOrStore(sockRaceKey{string(nonce), k}, new(uint64))
	return unsafe.Pointer(v.(*uint64))
}

func sockRaceRelease(tok unsafe.Pointer) { runtime.RaceReleaseMerge(tok) }
func sockRaceAcquire(tok unsafe.Pointer) { runtime.RaceAcquire(tok) }
