package allreduce

import (
	"math/bits"
	"sync"

	"google.golang.org/grpc/mem"
)

// noClearPool is the mem.BufferPool gRPC reads frames into. gRPC's default
// pool zeroes every buffer it hands out; every byte of ours is overwritten
// by the socket read at once, so that clearing is pure cost (6% of a rank's
// CPU at 256 MiB, 4 ranks, measured on the GPU machine's CPUs).
type noClearPool struct {
	classes [33]sync.Pool // by power of two of the capacity
}

var framePool = &noClearPool{}

func (p *noClearPool) Get(n int) *[]byte {
	c := bits.Len(uint(n - 1)) // smallest class with 1<<c >= n
	if n <= 1 {
		c = 0
	}
	if b, ok := p.classes[c].Get().(*[]byte); ok {
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n, 1<<c)
	return &b
}

func (p *noClearPool) Put(b *[]byte) {
	c := cap(*b)
	if c == 0 || c&(c-1) != 0 {
		return // not one of ours
	}
	p.classes[bits.Len(uint(c))-1].Put(b)
}

var _ mem.BufferPool = (*noClearPool)(nil)
