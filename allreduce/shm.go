package allreduce

import (
	"encoding/binary"
	"fmt"
	"os"
	"runtime"
	"sync/atomic"
	"time"
	"unsafe"

	pb "github.com/bmojo/bmojo/proto/allreducepb"
)

// The same-host data path. When a rank and its successor run on one machine
// (the usual deployment: one worker per GPU of a multi-GPU host), the chunk
// payloads of that hop go through a shared-memory file instead of a TCP
// stream, as NCCL's SHM transport does; gRPC stays the control plane (the
// HELLO that negotiates it, ABORTs, noticing a dead peer). Per byte this
// costs one copy into the slot on the sending side and the reduce (or copy)
// straight out of the slot on the receiving side, instead of two kernel
// copies, grpc-go's user-space copies and 16 KiB HTTP/2 frames.
//
// The sender creates the file (it knows the geometry: queues, slots, chunk
// size), maps it, and offers its path, a random nonce and its host identity
// in the first HELLO. The receiver checks the host identity is its own, maps
// the file, checks the file header carries the nonce and the expected
// epoch, ranks and geometry, unlinks the file and answers "ok" in its
// response headers. The sender unlinks it too once it has the answer
// (whatever it is), so after Connect the file has no name and nothing is left
// behind when either process is killed: the kernel frees the memory with the
// last mapping. Anything else (another host, a refusal, no answer) falls
// back to gRPC.
//
// Layout of the file (all little-endian):
//
//	[0, 4096)   file header (shmHdr*), then per queue q a control block at
//	            shmCtlOff + q*128: head (written by the producer) on one
//	            cache line, tail (written by the consumer) on the next
//	[4096, …)   queue 0's slots, queue 1's slots, … (ShmSlots each)
//
// Each queue is a single-producer single-consumer ring of slots: the
// producer (one sender goroutine) fills slot head%slots and then publishes it
// by storing head+1; the consumer (one receiver goroutine) validates and
// applies slot tail%slots and then frees it by storing tail+1. Chunk j of
// every step goes through queue j % queues, as it would go through stream
// j % Streams, so the queues reduce on as many cores. A slot is a 64-byte
// header (shmSlot* offsets: the fields of a DATA frame header plus the
// slot's sequence number) and the raw little-endian payload (float32 or
// bf16), 64-byte aligned for the AVX2 loops.
const (
	shmMagic      = "BMOJOSHM"
	shmVersion    = 1
	shmHdrBytes   = 4096
	shmCtlOff     = 128
	shmCtlBytes   = 128
	shmMaxQueues  = (shmHdrBytes - shmCtlOff) / shmCtlBytes
	shmMaxBytes   = 1 << 30 // larger geometries (huge ChunkBytes) stay on gRPC
	shmNamePrefix = "bmojo-allreduce-"

	shmHdrVersion  = 8
	shmHdrQueues   = 12
	shmHdrSlots    = 16
	shmHdrSlotSize = 20
	shmHdrNonce    = 24
	shmHdrEpoch    = 32
	shmHdrSrc      = 40
	shmHdrWorld    = 44

	slotHdrBytes = 64
	slotMagic    = 0x4c534d42 // "BMSL"
	slotMagicOff = 0
	slotKindOff  = 4
	slotDtypeOff = 5
	slotEpochOff = 8
	slotOpOff    = 16
	slotTotalOff = 24
	slotStepOff  = 32
	slotChunkOff = 36
	slotElemsOff = 40
	slotSrcOff   = 44
	slotSeqOff   = 48
)

// shmMetaKey is the response-header key in which the receiver answers a
// same-host offer: "ok", or why it refused.
const shmMetaKey = "bmojo-shm"

// shmDir is where the shared-memory files are created: /dev/shm (tmpfs),
// else the temporary directory.
func shmDir() string {
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		return "/dev/shm"
	}
	return os.TempDir()
}

// shmGeometry is the shape of one shared-memory file.
type shmGeometry struct {
	queues, slots, slotBytes int
}

func newShmGeometry(cfg Config) shmGeometry {
	return shmGeometry{
		queues:    cfg.ShmQueues,
		slots:     cfg.ShmSlots,
		slotBytes: slotHdrBytes + (cfg.ChunkBytes+63)&^63,
	}
}

func (g shmGeometry) size() int { return shmHdrBytes + g.queues*g.slots*g.slotBytes }

// shmRegion is one mapped shared-memory file: the successor hop's (we
// produce) or the predecessor hop's (we consume).
type shmRegion struct {
	mem    []byte
	geo    shmGeometry
	path   string // sender side, until unlinked
	nonce  uint64
	queues []shmQueue
	ipc    *shmIPC // device slots (cuda-ipc, ipc.go); nil: host only
}

// shmQueue is one single-producer single-consumer slot ring in a region.
type shmQueue struct {
	head, tail *atomic.Uint64 // in the mapping, each on its own cache line
	slots      []byte
	n          uint64
	slotBytes  int
	raceTok    unsafe.Pointer // -race builds only (shm_race.go)
}

func (q *shmQueue) slot(seq uint64) []byte {
	off := int(seq%q.n) * q.slotBytes
	return q.slots[off : off+q.slotBytes : off+q.slotBytes]
}

// layout points the region's queues into its mapping.
func (s *shmRegion) layout() {
	g := s.geo
	s.queues = make([]shmQueue, g.queues)
	for q := range s.queues {
		ctl := shmCtlOff + q*shmCtlBytes
		start := shmHdrBytes + q*g.slots*g.slotBytes
		s.queues[q] = shmQueue{
			head:      (*atomic.Uint64)(unsafe.Pointer(&s.mem[ctl])),
			tail:      (*atomic.Uint64)(unsafe.Pointer(&s.mem[ctl+64])),
			slots:     s.mem[start : start+g.slots*g.slotBytes],
			n:         uint64(g.slots),
			slotBytes: g.slotBytes,
			raceTok:   shmRaceToken(s.nonce, q),
		}
	}
}

// writeHeader fills in the file header the receiver checks.
func (s *shmRegion) writeHeader(epoch uint64, src, world int) {
	h := s.mem[:shmHdrBytes]
	le := binary.LittleEndian
	le.PutUint32(h[shmHdrVersion:], shmVersion)
	le.PutUint32(h[shmHdrQueues:], uint32(s.geo.queues))
	le.PutUint32(h[shmHdrSlots:], uint32(s.geo.slots))
	le.PutUint32(h[shmHdrSlotSize:], uint32(s.geo.slotBytes))
	le.PutUint64(h[shmHdrNonce:], s.nonce)
	le.PutUint64(h[shmHdrEpoch:], epoch)
	le.PutUint32(h[shmHdrSrc:], uint32(src))
	le.PutUint32(h[shmHdrWorld:], uint32(world))
	copy(h, shmMagic) // last: a half-written header never looks valid
}

// checkHeader validates a mapped file against the HELLO that offered it and
// returns its geometry.
func checkShmHeader(mem []byte, nonce, epoch uint64, src, world int) (shmGeometry, error) {
	if len(mem) < shmHdrBytes {
		return shmGeometry{}, fmt.Errorf("file of %d bytes is shorter than its header", len(mem))
	}
	le := binary.LittleEndian
	h := mem[:shmHdrBytes]
	switch {
	case string(h[:8]) != shmMagic:
		return shmGeometry{}, fmt.Errorf("magic %q, want %q", h[:8], shmMagic)
	case le.Uint32(h[shmHdrVersion:]) != shmVersion:
		return shmGeometry{}, fmt.Errorf("version %d, this build speaks %d", le.Uint32(h[shmHdrVersion:]), shmVersion)
	case le.Uint64(h[shmHdrNonce:]) != nonce:
		return shmGeometry{}, fmt.Errorf("nonce differs from the hello's: not the file the peer created")
	case le.Uint64(h[shmHdrEpoch:]) != epoch || int(le.Uint32(h[shmHdrSrc:])) != src || int(le.Uint32(h[shmHdrWorld:])) != world:
		return shmGeometry{}, fmt.Errorf("file is for epoch %d, rank %d of %d; want epoch %d, rank %d of %d",
			le.Uint64(h[shmHdrEpoch:]), le.Uint32(h[shmHdrSrc:]), le.Uint32(h[shmHdrWorld:]), epoch, src, world)
	}
	g := shmGeometry{
		queues:    int(le.Uint32(h[shmHdrQueues:])),
		slots:     int(le.Uint32(h[shmHdrSlots:])),
		slotBytes: int(le.Uint32(h[shmHdrSlotSize:])),
	}
	if g.queues < 1 || g.queues > shmMaxQueues || g.slots < 1 || g.slots > 1<<16 ||
		g.slotBytes < slotHdrBytes+4 || g.slotBytes%64 != 0 || g.size() != len(mem) {
		return shmGeometry{}, fmt.Errorf("geometry %d queues × %d slots × %d bytes does not fit a file of %d bytes", g.queues, g.slots, g.slotBytes, len(mem))
	}
	return g, nil
}

// spinWait is how both ends wait on the other: spin briefly (the other side
// is usually a few hundred nanoseconds away), then yield, then sleep in
// short, growing steps. The sleep is a nanosleep system call rather than
// time.Sleep: Go's timers round sub-millisecond sleeps of an idle process up
// to a millisecond, which would add a millisecond to every wait.
type spinWait struct{ n int }

const (
	spinIters  = 64
	yieldIters = 16
	sleepMin   = 5 * time.Microsecond
	sleepMax   = 50 * time.Microsecond // plus the kernel's 50 µs timer slack
)

func (w *spinWait) wait() {
	w.n++
	switch {
	case w.n <= spinIters:
	case w.n <= spinIters+yieldIters:
		runtime.Gosched()
	default:
		d := min(sleepMin<<min(w.n-spinIters-yieldIters-1, 8), sleepMax)
		nanosleep(d)
	}
}

// shmSendLoop is sendLoop over shared memory: chunks j ≡ q (mod queues) of
// every step, written into queue q's slots.
func (r *Ring) shmSendLoop(op *opState, q int) error {
	reg := r.shmOut
	qu := &reg.queues[q]
	nq := len(reg.queues)
	p := op.plan
	size := dtypeSize(r.dtype)
	return r.sends(op, q, nq, func(s, j, lo, hi int) error {
		seq := qu.head.Load()
		var w spinWait
		for seq-qu.tail.Load() >= qu.n {
			select {
			case <-r.failedCh:
				return errStopSend
			default:
			}
			w.wait()
		}
		qu.raceAcquire()
		slot := qu.slot(seq)
		where := byte(slotInHost)
		payload := slot[slotHdrBytes : slotHdrBytes+(hi-lo)*size]
		if op.dev != nil {
			// A device collective (ipc.go): float32 only.
			var err error
			if where, err = r.ipcFillSlot(op, reg, q, seq, slot, lo, hi); err != nil {
				return err
			}
		} else if src := op.buf[lo:hi]; r.dtype == pb.DType_DTYPE_BF16 {
			if idx := p.Index(s-1, j); s > op.first && op.prep[idx] != nil {
				// Made by apply while the values were in
				// registers (the chunk came over gRPC).
				copy(payload, op.prep[idx])
				putWireBuf(op.prep[idx])
				op.prep[idx] = nil
			} else {
				// The bits apply would have made: the chunk's
				// values are bf16-exact after a finishing or
				// all-gather step, and rounded here otherwise.
				toBF16(payload, src)
			}
		} else {
			copy(payload, f32Bytes(src))
		}
		putSlotHeader(slot, seq, &pb.FrameHeader{
			Kind: pb.Kind_KIND_DATA, Epoch: r.cfg.Epoch, SrcRank: uint32(r.rank),
			Op: op.id, Step: uint32(s), Chunk: uint32(j), TotalElems: uint64(p.Length),
			Dtype: r.dtype, Elems: uint32(hi - lo),
		})
		slot[slotWhereOff] = where
		qu.raceRelease()
		qu.head.Store(seq + 1) // publishes the slot (a release store)
		r.stats.FramesSent.Add(1)
		r.stats.BytesSent.Add(uint64(len(payload)))
		return nil
	})
}

// putSlotHeader writes the header of slot number seq.
func putSlotHeader(slot []byte, seq uint64, h *pb.FrameHeader) {
	le := binary.LittleEndian
	le.PutUint32(slot[slotMagicOff:], slotMagic)
	slot[slotKindOff] = byte(h.Kind)
	slot[slotDtypeOff] = byte(h.Dtype)
	slot[slotWhereOff] = slotInHost // a device collective's sender sets it after (ipc.go)
	le.PutUint64(slot[slotEpochOff:], h.Epoch)
	le.PutUint64(slot[slotOpOff:], h.Op)
	le.PutUint64(slot[slotTotalOff:], h.TotalElems)
	le.PutUint32(slot[slotStepOff:], h.Step)
	le.PutUint32(slot[slotChunkOff:], h.Chunk)
	le.PutUint32(slot[slotElemsOff:], h.Elems)
	le.PutUint32(slot[slotSrcOff:], h.SrcRank)
	le.PutUint64(slot[slotSeqOff:], seq)
}

// parseSlotHeader reads what putSlotHeader wrote: the frame header, the
// sequence number and the magic (for the caller to check).
func parseSlotHeader(slot []byte) (h *pb.FrameHeader, seq uint64, magic uint32) {
	le := binary.LittleEndian
	h = &pb.FrameHeader{
		Kind:       pb.Kind(slot[slotKindOff]),
		Epoch:      le.Uint64(slot[slotEpochOff:]),
		SrcRank:    le.Uint32(slot[slotSrcOff:]),
		Op:         le.Uint64(slot[slotOpOff:]),
		Step:       le.Uint32(slot[slotStepOff:]),
		Chunk:      le.Uint32(slot[slotChunkOff:]),
		TotalElems: le.Uint64(slot[slotTotalOff:]),
		Dtype:      pb.DType(slot[slotDtypeOff]),
		Elems:      le.Uint32(slot[slotElemsOff:]),
	}
	return h, le.Uint64(slot[slotSeqOff:]), le.Uint32(slot[slotMagicOff:])
}

// shmConsume is queue q's consumer: for every collective this rank starts,
// it applies exactly the slots the plan routes through queue q, in order.
// It only polls while a collective runs, so an idle ring costs no CPU; the
// predecessor may run ahead by as many slots as the queue holds.
func (r *Ring) shmConsume(reg *shmRegion, q int) {
	r.consume(func(op *opState) error { return r.shmRecvOp(reg, q, op) })
}

// consume runs recv once for every collective this rank starts, in order,
// until the ring fails or stops (the consumer loop of the shared-memory
// queues and of the data sockets); a recv error fails the ring. It waits
// while no collective runs. It is one of r.wg's goroutines.
func (r *Ring) consume(recv func(*opState) error) {
	defer r.wg.Done()
	var seen uint64
	for {
		r.mu.Lock()
		op, started := r.cur, r.opCh
		r.mu.Unlock()
		if op != nil && op.id > seen {
			seen = op.id
			if err := recv(op); err != nil {
				r.fail(err)
				return
			}
			continue
		}
		select {
		case <-started:
		case <-r.failedCh:
			return
		case <-r.stopCh:
			return
		}
	}
}

func (r *Ring) shmRecvOp(reg *shmRegion, q int, op *opState) error {
	p := op.plan
	nq := len(reg.queues)
	per := 0
	if q < p.Chunks {
		per = (p.Chunks - q + nq - 1) / nq
	}
	qu := &reg.queues[q]
	for i := 0; i < per*(op.end-op.first); i++ {
		seq := qu.tail.Load()
		var w spinWait
		for {
			head := qu.head.Load()
			if head != seq {
				if head-seq > qu.n {
					return &PeerError{Rank: r.pred, Via: r.rank, Op: op.id, Step: -1, Chunk: -1,
						Err: fmt.Errorf("shared-memory queue %d: head %d is more than %d slots past tail %d: %w", q, head, qu.n, seq, ErrFrame)}
				}
				break
			}
			select {
			case <-r.failedCh:
				return nil
			case <-r.stopCh:
				return nil
			default:
			}
			w.wait()
		}
		qu.raceAcquire()
		if err := r.applySlot(op, reg, q, seq); err != nil {
			return err
		}
		qu.raceRelease()
		qu.tail.Store(seq + 1) // frees the slot
	}
	return nil
}

// applySlot validates slot seq of queue q as frame decoding and deliver
// validate a DATA frame, then reduces or copies its payload straight out of
// the slot.
func (r *Ring) applySlot(op *opState, reg *shmRegion, q int, seq uint64) error {
	slot := reg.queues[q].slot(seq)
	bad := func(sentinel error, format string, a ...any) error {
		return &PeerError{Rank: r.pred, Via: r.rank, Op: op.id, Step: -1, Chunk: -1,
			Err: fmt.Errorf("shared-memory queue %d slot %d: %s: %w", q, seq, fmt.Sprintf(format, a...), sentinel)}
	}
	h, got, magic := parseSlotHeader(slot)
	if magic != slotMagic {
		return bad(ErrFrame, "magic %#x, want %#x", magic, slotMagic)
	}
	if got != seq {
		return bad(ErrFrame, "carries sequence number %d", got)
	}
	if h.Kind != pb.Kind_KIND_DATA {
		return bad(ErrFrame, "kind %v", h.Kind)
	}
	size := dtypeSize(h.Dtype)
	if size == 0 {
		return bad(ErrFrame, "dtype %v", h.Dtype)
	}
	if int64(h.Elems)*int64(size) > int64(len(slot)-slotHdrBytes) {
		return bad(ErrFrame, "%d %v elements do not fit a slot of %d bytes", h.Elems, h.Dtype, len(slot)-slotHdrBytes)
	}
	where := fmt.Sprintf("shared-memory queue %d", q)
	if err := r.checkSender(h, where); err != nil {
		return err
	}
	s, j := int(h.Step), int(h.Chunk)
	switch {
	case h.Op != op.id:
		return &PeerError{Rank: r.pred, Via: r.rank, Op: h.Op, Step: s, Chunk: j,
			Err: fmt.Errorf("frame for op %d while at op %d on %s: %w", h.Op, op.id, where, ErrProtocol)}
	case j < op.plan.Chunks && j%len(reg.queues) != q:
		return &PeerError{Rank: r.pred, Via: r.rank, Op: op.id, Step: s, Chunk: j,
			Err: fmt.Errorf("chunk on %s, want queue %d: %w", where, j%len(reg.queues), ErrProtocol)}
	}
	payload := slot[slotHdrBytes : slotHdrBytes+int(h.Elems)*size]
	switch where := slot[slotWhereOff]; {
	case where == slotInDevice && (reg.ipc == nil || h.Dtype != pb.DType_DTYPE_F32):
		return bad(ErrFrame, "a %v payload in device memory on a hop without device slots or not float32", h.Dtype)
	case where > slotInDevice:
		return bad(ErrFrame, "payload location %d", where)
	case op.dev != nil:
		return r.ipcApplySlot(op, reg, q, seq, h, where, payload)
	case where == slotInDevice:
		if err := r.ipcSlotToHost(op, reg, q, seq, payload); err != nil {
			return err
		}
	}
	return r.apply(op, &inFrame{hdr: h, payload: [][]byte{payload}, slot: payload})
}
