package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/bmojo/bmojo/allreduce"
	"github.com/bmojo/bmojo/model"
)

// TestBenchStepWorkers: bench step --workers 2 on the CPU trains two
// replicas over a real ring through both reductions and reports, beside
// one replica alone, tokens/s, the communication each step had in flight,
// the part it waited for, and the fraction hidden. A hang fails the test
// within its deadline instead of the package's.
func TestBenchStepWorkers(t *testing.T) {
	c, err := model.Preset("bmojo-tiny")
	if err != nil {
		t.Fatal(err)
	}
	c.SeqLen = 32
	o := stepWorkersOpts{workers: 2, copies: "both", transport: allreduce.TransportAuto, dev: "cpu", batch: 1, steps: 2}
	if err := o.validate(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var out bytes.Buffer
	var rep stepWorkersReport
	done := make(chan error, 1)
	go func() {
		var err error
		rep, err = benchStepWorkers(ctx, &out, c, "bmojo-tiny", o)
		done <- err
	}()
	select {
	case err = <-done:
	case <-time.After(3 * time.Minute):
		cancel()
		t.Fatalf("bench step --workers 2 still running after 3 minutes:\n%s", out.String())
	}
	if err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	if len(rep.Rows) != 3 {
		t.Fatalf("%d rows, want alone, overlapped and sync:\n%s", len(rep.Rows), out.String())
	}
	for i, want := range []struct {
		workers   int
		reduction string
	}{{1, "alone"}, {2, "overlapped"}, {2, "sync"}} {
		r := rep.Rows[i]
		if r.Workers != want.workers || r.Reduction != want.reduction {
			t.Errorf("row %d is %d × %s, want %d × %s", i, r.Workers, r.Reduction, want.workers, want.reduction)
		}
		if !(r.TokensPerS > 0) || !(r.StepMs > 0) {
			t.Errorf("%s: %v tokens/s, %v ms per step", r.Reduction, r.TokensPerS, r.StepMs)
		}
		if r.Reduction == "alone" {
			if r.CommMs != 0 {
				t.Errorf("one replica alone had %v ms of communication", r.CommMs)
			}
			continue
		}
		if !(r.CommMs > 0) || !(r.ExposedMs > 0) || r.Hidden < 0 || r.Hidden > 1 || r.Transport == "" {
			t.Errorf("%s: comm %v ms, exposed %v ms, hidden %v, hop %q", r.Reduction, r.CommMs, r.ExposedMs, r.Hidden, r.Transport)
		}
	}
	for _, want := range []string{"comm (ms)", "exposed (ms)", "hidden", "2        overlapped", "2        sync", "196672 parameters"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}

// TestBenchStepWorkersFlags: a bad --workers setting names its flag.
func TestBenchStepWorkersFlags(t *testing.T) {
	good := stepWorkersOpts{workers: 2, copies: "both", transport: allreduce.TransportAuto, dev: "cpu", batch: 1, steps: 1}
	for _, tc := range []struct {
		name string
		edit func(*stepWorkersOpts)
		want string
	}{
		{"copies", func(o *stepWorkersOpts) { o.copies = "async" }, `--copies "async"`},
		{"transport", func(o *stepWorkersOpts) { o.transport = "socket" }, `--transport "socket"`},
		{"steps", func(o *stepWorkersOpts) { o.steps = 0 }, "--steps"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := good
			tc.edit(&o)
			if err := o.validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want one naming %s", err, tc.want)
			}
		})
	}
}
