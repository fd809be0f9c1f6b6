package robustness

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"strconv"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/bmojo/bmojo/data"
	"github.com/bmojo/bmojo/job"
)

// This file is the suite's independent ledger check, which tests/chaos
// shares: what the workers reported against what the sampler says.

// ReadLedger reads every ledger entry of jobName, by the step its key
// names. A key that is not a step, or whose entry does not decode or names
// another step, is an error.
func ReadLedger(ctx context.Context, cli *clientv3.Client, jobName string) (map[int]job.LedgerEntry, error) {
	prefix := job.Prefix(jobName) + job.KeyLedger
	resp, err := cli.Get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("read ledger: %w", err)
	}
	out := make(map[int]job.LedgerEntry, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		k := string(kv.Key)
		step, err := strconv.Atoi(strings.TrimPrefix(k, prefix))
		if err != nil {
			return nil, fmt.Errorf("ledger key %s names no step", k)
		}
		var e job.LedgerEntry
		if err := job.Decode(k, kv.Value, &e); err != nil {
			return nil, err
		}
		if e.Step != step {
			return nil, fmt.Errorf("%s holds the entry of step %d", k, e.Step)
		}
		out[step] = e
	}
	return out, nil
}

// CheckLedger checks the ledger l of a finished job j without trusting the
// workers: from the job's dataset, seed and data.BatchRange it recomputes
// which sample positions each rank of each step's ring had to read and the
// checksum of those token windows (read straight from the dataset's shards
// at the sampler's window offsets, hashed here: FNV-1a 64 over each
// window's seqLen+1 tokens as 4-byte little-endian integers). Every step
// 0..j.Steps-1 must have exactly one entry, no other step any; each entry's
// reports must tile the step's global batch, every position once, in the
// ranges BatchRange gives a ring of that size, each with the checksum of
// the windows at those positions. It returns every problem found (nil if
// none).
func CheckLedger(j job.Job, l map[int]job.LedgerEntry) error {
	mc, err := j.ModelConfig()
	if err != nil {
		return err
	}
	ds, err := data.Load(j.Data, data.SplitTrain)
	if err != nil {
		return err
	}
	sampler, err := data.NewSampler(ds, mc.SeqLen, j.Seed)
	if err != nil {
		return err
	}
	T, GB := mc.SeqLen, j.BatchSize
	checksum := func(start, count int) string {
		h := fnv.New64a()
		var b [4]byte
		for p := start; p < start+count; p++ {
			shard, off := sampler.Window(0, p)
			for _, tok := range ds.Shard(shard)[off : off+int64(T)+1] {
				binary.LittleEndian.PutUint32(b[:], uint32(tok))
				h.Write(b[:])
			}
		}
		return fmt.Sprintf("%016x", h.Sum64())
	}
	var errs []error
	fail := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	for s := range l {
		if s < 0 || s >= j.Steps {
			fail("ledger has an entry for step %d, outside the job's steps 0..%d", s, j.Steps-1)
		}
	}
	for s := range j.Steps {
		e, ok := l[s]
		if !ok {
			fail("ledger has no entry for step %d", s)
			continue
		}
		n := len(e.Workers)
		if n == 0 {
			fail("step %d: the entry reports no worker", s)
			continue
		}
		seen := make([]int, GB)
		ids := map[string]bool{}
		for r, w := range e.Workers {
			if w.Rank != r || w.ID == "" || ids[w.ID] {
				fail("step %d: report %d names rank %d, id %q (ids must be distinct, ranks in order)", s, r, w.Rank, w.ID)
			}
			ids[w.ID] = true
			for p := w.Start; p < w.Start+w.Count; p++ {
				if p < s*GB || p >= (s+1)*GB {
					fail("step %d: %s consumed position %d outside the step's batch [%d,%d)", s, w.ID, p, s*GB, (s+1)*GB)
					break
				}
				seen[p-s*GB]++
			}
			start, count, err := data.BatchRange(s, GB, r, n)
			if err != nil {
				fail("step %d: %v", s, err)
				continue
			}
			if w.Start != start || w.Count != count {
				fail("step %d: %s (rank %d of %d) read [%d,+%d), the sampler gives it [%d,+%d)", s, w.ID, r, n, w.Start, w.Count, start, count)
				continue
			}
			if want := checksum(start, count); w.Checksum != want {
				fail("step %d: %s (rank %d of %d) read windows with checksum %q, the dataset's windows at [%d,+%d) have %s",
					s, w.ID, r, n, w.Checksum, start, count, want)
			}
		}
		for i, c := range seen {
			if c != 1 {
				fail("step %d: sample %d consumed %d times", s, s*GB+i, c)
			}
		}
	}
	if len(errs) > 10 {
		errs = append(errs[:10], fmt.Errorf("... and %d more problems", len(errs)-10))
	}
	return errors.Join(errs...)
}
