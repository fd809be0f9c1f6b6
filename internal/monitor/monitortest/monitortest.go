// Package monitortest writes a fixed, realistic job into etcd for the
// monitor's tests and `bmojo status`'s: two workers that trained 40 of 100
// steps, a third that left, events, a checkpoint.
package monitortest

import (
	"context"
	"fmt"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/bmojo/bmojo/job"
)

// Steps and Step are the populated job's planned and committed steps.
const (
	Steps = 100
	Step  = 40
)

// Populate writes job's records under job.Prefix(job).
func Populate(ctx context.Context, cli *clientv3.Client, jobName string) error {
	p := job.Prefix(jobName)
	put := func(k string, v any) error {
		s, ok := v.(string)
		if !ok {
			s = job.Encode(v)
		}
		if _, err := cli.Put(ctx, p+k, s); err != nil {
			return fmt.Errorf("monitortest: put %s: %w", k, err)
		}
		return nil
	}
	t0 := 1_800_000_000.0
	recs := []struct {
		k string
		v any
	}{
		{job.KeySpec, job.Spec{Protocol: job.ProtocolVersion, YAML: "name: " + jobName + "\nsteps: 100\n", Hash: "h", Workers: 3, MinRing: 1}},
		{job.KeyMembers + "w0", job.Member{ID: "w0", Endpoint: "10.0.0.1:7000", Device: "cpu"}},
		{job.KeyMembers + "w1", job.Member{ID: "w1", Endpoint: "10.0.0.2:7000", Device: "cpu"}},
		{job.KeyRing, job.Ring{Epoch: 2, Reason: "w2 left", Members: []job.RingMember{{ID: "w0", Endpoint: "10.0.0.1:7000"}, {ID: "w1", Endpoint: "10.0.0.2:7000"}}}},
		{job.KeyStats + "w0", job.WorkerStats{ID: "w0", Rank: 0, Epoch: 2, Step: Step, Device: "cuda:0 NVIDIA H200", StepSeconds: 1.6, DataSeconds: 0.01, ComputeSec: 1.0, WaitSeconds: 0.55, OptimSeconds: 0.04, TokensPerS: 640, Loss: 2.5, GradNorm: 0.8, CheckpointSec: 0.3, UpdatedUnix: t0 + 60,
			GPU: &job.GPUStats{UUID: "GPU-0000", UtilPercent: 87, MemUsedBytes: 40e9, MemTotal: 141e9, PowerWatts: 550, TempCelsius: 61}, ArrivalUnix: t0 + 59.0}},
		{job.KeyStats + "w1", job.WorkerStats{ID: "w1", Rank: 1, Epoch: 2, Step: Step, Device: "cpu", StepSeconds: 1.6, DataSeconds: 0.01, ComputeSec: 1.5, WaitSeconds: 0.05, OptimSeconds: 0.04, TokensPerS: 640, Loss: 2.5, GradNorm: 0.8, UpdatedUnix: t0 + 60, ArrivalUnix: t0 + 59.5}},
		{job.KeyStats + "w2", job.WorkerStats{ID: "w2", Rank: 2, Epoch: 1, Step: 20, Device: "cpu", StepSeconds: 1.2, ComputeSec: 1.0, UpdatedUnix: t0 + 30}},
		{job.KeyEvents + "x", "not json"}, // malformed records are skipped
	}
	for _, r := range recs {
		if err := put(r.k, r.v); err != nil {
			return err
		}
	}
	for s := range Step {
		if err := put(job.LedgerKey(s), job.LedgerEntry{Step: s, Epoch: 1 + uint64(s/20), Loss: 4 - float64(s)/Step*1.5}); err != nil {
			return err
		}
	}
	// Progress records as rank 0 writes them: one step per 1.5 s.
	for s := 1; s <= Step; s++ {
		pr := job.Progress{Step: s, Steps: Steps, Epoch: 1 + uint64(s/21), Loss: 4 - float64(s-1)/Step*1.5,
			TokensPerS: 1280, Workers: 2, Skipped: 1, UpdatedUnix: t0 + 1.5*float64(s)}
		if s%20 == 0 {
			pr.ValLoss = 3 - float64(s)/Steps
		}
		if err := put(job.KeyProgress, pr); err != nil {
			return err
		}
	}
	evs := []job.Event{
		{Kind: "leader_elected", Epoch: 0, Reason: "replica c1 leads"},
		{Kind: "joined", WorkerID: "w0", Reason: "registered at 10.0.0.1:7000"},
		{Kind: "joined", WorkerID: "w1", Reason: "registered at 10.0.0.2:7000"},
		{Kind: "joined", WorkerID: "w2", Reason: "registered at 10.0.0.3:7000"},
		{Kind: "ring", Epoch: 1, Reason: "initial ring of 3 workers"},
		{Kind: "started", Epoch: 1, Reason: "step 0 from w0"},
		{Kind: "left", WorkerID: "w2", Epoch: 1, Reason: "lease expired or key deleted"},
		{Kind: "ring", Epoch: 2, Reason: "w2 left"},
		{Kind: "started", Epoch: 2, Reason: "step 20 from w0", RecoverySeconds: 3.25},
	}
	for i, ev := range evs {
		ev.Seq, ev.TimeUnix, ev.Leader = uint64(i+1), t0+float64(i), "c1"
		if err := put(job.EventKey(ev.Seq), ev); err != nil {
			return err
		}
	}
	if err := put(job.CheckpointKey(30), job.Manifest{Step: 30, Epoch: 2, Dir: "/ckpt/step-30"}); err != nil {
		return err
	}
	return put(job.KeyLatestCkpt, "30")
}
