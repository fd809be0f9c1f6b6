// Package scale is the data-parallel scaling model behind `bmojo bench
// scale`: from one worker's compute time per step, the gradient's buckets
// and the all-reduce bandwidths and latencies inside and between hosts, it
// predicts the step time, tokens/s and scaling efficiency of N workers per
// host × M hosts, for the flat ring and for the hierarchical scheme.
//
// It is arithmetic only: no clocks, no I/O, no logging. Measuring the inputs
// is the command's job (cmd/bmojo/bench_scale.go); the package must not
// import anything that runs a step or opens a socket.
//
// Units: seconds, bytes and bytes per second throughout. Bus bandwidth
// (busbw) follows nccl-tests: an all-reduce of S bytes over n ranks that
// takes t seconds has algbw S/t and busbw algbw·2(n−1)/n, so the time of the
// bandwidth term is 2(n−1)/n · S / busbw.
package scale

import (
	"errors"
	"fmt"
	"math"
)

// ErrInput is wrapped by every error about an input out of range.
var ErrInput = errors.New("scale: bad input")

// Link is one class of ring hop: inside a host or between hosts.
type Link struct {
	// BusBW is the all-reduce bus bandwidth in bytes/s (nccl-tests'
	// definition) that a ring over this kind of hop reaches for large
	// buffers. +Inf is allowed (no bandwidth cost).
	BusBW float64
	// Latency is the fixed cost of one ring step over this hop in seconds
	// (an all-reduce over n ranks takes 2(n−1) steps).
	Latency float64
}

// Scheme is how the gradient is summed across hosts.
type Scheme string

const (
	// Flat is one ring over all N·M ranks: every step waits for the
	// slowest hop, so the bandwidth term uses the slowest link's busbw.
	Flat Scheme = "flat"
	// Hierarchical is a reduce-scatter inside each host, a ring across
	// hosts on each rank's 1/N shard (N such rings share the host's
	// network), then an all-gather inside each host.
	Hierarchical Scheme = "hierarchical"
)

// Topology is N workers (GPUs, or CPU worker processes) per host × M hosts.
type Topology struct {
	PerHost int // N
	Hosts   int // M
}

// Ranks is N·M.
func (t Topology) Ranks() int { return t.PerHost * t.Hosts }

func (t Topology) String() string { return fmt.Sprintf("%d×%d", t.PerHost, t.Hosts) }

// Input is what the model needs about one worker's step and the links.
type Input struct {
	// StepSeconds is one worker's step without communication: forward,
	// backward and the optimizer, as `bench step` times it.
	StepSeconds float64
	// BackwardShare is the fraction of StepSeconds spent in backward, the
	// only part of the step that gradient buckets can hide behind (0..1].
	BackwardShare float64
	// TokensPerStep is what one worker trains on per step (batch × seq len).
	TokensPerStep float64
	// Buckets are the gradient's all-reduce buckets in bytes on the wire,
	// in the order backward produces them (the worker all-reduces one
	// bucket per layer, last layer first, then the embedding). Buckets run
	// one at a time in this order, as allreduce.Ring runs collectives.
	Buckets []float64
	// Overlap is the fraction of backward that communication may run
	// under (0..1). 0: nothing starts before backward ends (step = compute
	// + all communication). 1: each bucket may start as soon as backward
	// has produced it, backward producing bytes at an even rate.
	Overlap float64
	// Intra and Inter are the hops inside a host and between hosts.
	Intra, Inter Link
	// LatencyOnly is the number of tiny collectives per step after the
	// gradient (the worker sums the loss: 1); each costs the latency terms
	// only.
	LatencyOnly int
	// StageSeconds is time per step that only a multi-worker step spends
	// and nothing hides: a GPU worker on a host-memory ring downloads each
	// gradient bucket before its all-reduce and uploads the sums after
	// (worker/step.go), both synchronous. 0 for a GPU-resident ring or CPU
	// workers.
	StageSeconds float64
	// BaselineTokensPerS is what efficiency is relative to: one worker
	// alone. 0 means TokensPerStep/StepSeconds. (CPU workers that share
	// cores run slower steps than one worker alone; this keeps that loss
	// in the efficiency.)
	BaselineTokensPerS float64
}

// Validate names the first input out of range.
func (in Input) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrInput, fmt.Sprintf(format, a...))
	}
	switch {
	case !(in.StepSeconds > 0) || math.IsInf(in.StepSeconds, 0):
		return bad("step time must be positive and finite, got %v s", in.StepSeconds)
	case !(in.BackwardShare > 0 && in.BackwardShare <= 1):
		return bad("backward share must be in (0, 1], got %v", in.BackwardShare)
	case !(in.TokensPerStep > 0):
		return bad("tokens per step must be positive, got %v", in.TokensPerStep)
	case !(in.Overlap >= 0 && in.Overlap <= 1):
		return bad("overlap must be in [0, 1], got %v", in.Overlap)
	case in.LatencyOnly < 0:
		return bad("latency-only collectives must be >= 0, got %d", in.LatencyOnly)
	case !(in.StageSeconds >= 0) || math.IsInf(in.StageSeconds, 0):
		return bad("staging time must be >= 0 and finite, got %v s", in.StageSeconds)
	case in.BaselineTokensPerS < 0 || math.IsNaN(in.BaselineTokensPerS):
		return bad("baseline tokens/s must be >= 0, got %v", in.BaselineTokensPerS)
	case len(in.Buckets) == 0:
		return bad("no gradient buckets")
	}
	for i, b := range in.Buckets {
		if !(b >= 0) || math.IsInf(b, 0) {
			return bad("bucket %d has %v bytes", i, b)
		}
	}
	for _, l := range []struct {
		name string
		Link
	}{{"intra-host", in.Intra}, {"inter-host", in.Inter}} {
		if !(l.BusBW > 0) {
			return bad("%s busbw must be positive, got %v B/s", l.name, l.BusBW)
		}
		if !(l.Latency >= 0) || math.IsInf(l.Latency, 0) {
			return bad("%s latency must be >= 0 and finite, got %v s", l.name, l.Latency)
		}
	}
	return nil
}

func (t Topology) validate() error {
	if t.PerHost < 1 || t.Hosts < 1 {
		return fmt.Errorf("%w: topology %d per host × %d hosts: both must be >= 1", ErrInput, t.PerHost, t.Hosts)
	}
	return nil
}

// ringSeconds is an all-reduce of bytes over n ranks through a ring whose
// every step costs lat and whose bandwidth term runs at busbw.
func ringSeconds(bytes float64, n int, l Link) float64 {
	if n <= 1 {
		return 0
	}
	f := float64(n)
	return 2*(f-1)/f*bytes/l.BusBW + 2*(f-1)*l.Latency
}

// halfRingSeconds is a reduce-scatter (or an all-gather) of bytes over n
// ranks: half of a ring all-reduce's steps and bytes.
func halfRingSeconds(bytes float64, n int, l Link) float64 {
	return ringSeconds(bytes, n, l) / 2
}

// slowest is the hop a flat ring over t waits for: the intra-host one on
// one host, the inter-host one with one worker per host, and otherwise the
// lower bandwidth and the higher latency of the two.
func slowest(t Topology, intra, inter Link) Link {
	switch {
	case t.Hosts == 1:
		return intra
	case t.PerHost == 1:
		return inter
	}
	return Link{BusBW: math.Min(intra.BusBW, inter.BusBW), Latency: math.Max(intra.Latency, inter.Latency)}
}

// AllReduceSeconds is the time of one all-reduce of bytes over t with
// scheme s.
//
// Flat: 2(n−1)/n · bytes / busbw(slowest hop) + 2(n−1) · latency(slowest
// hop), n = N·M.
//
// Hierarchical: a reduce-scatter and an all-gather inside each host
// (together 2(N−1)/N · bytes / intra busbw + 2(N−1) · intra latency), and
// between them N rings across the M hosts, one per shard of bytes/N, which
// share the host's network: 2(M−1)/M · bytes / inter busbw + 2(M−1) · inter
// latency. Inter busbw is therefore what one host's network gives all its
// rings together.
func AllReduceSeconds(bytes float64, t Topology, s Scheme, intra, inter Link) (float64, error) {
	if err := t.validate(); err != nil {
		return 0, err
	}
	if !(bytes >= 0) {
		return 0, fmt.Errorf("%w: all-reduce of %v bytes", ErrInput, bytes)
	}
	switch s {
	case Flat:
		return ringSeconds(bytes, t.Ranks(), slowest(t, intra, inter)), nil
	case Hierarchical:
		in := 2 * halfRingSeconds(bytes, t.PerHost, intra)
		// N shard rings of bytes/N each, run concurrently over one
		// network: the bandwidth term is the whole buffer's, the latency
		// term one ring's.
		across := 0.0
		if t.Hosts > 1 {
			m := float64(t.Hosts)
			across = 2*(m-1)/m*bytes/inter.BusBW + 2*(m-1)*inter.Latency
		}
		return in + across, nil
	}
	return 0, fmt.Errorf("%w: unknown scheme %q (want %q or %q)", ErrInput, s, Flat, Hierarchical)
}

// Prediction is the model's answer for one topology and scheme.
type Prediction struct {
	Topology Topology
	Scheme   Scheme
	Ranks    int
	// CommSeconds is the step's communication run alone: every bucket and
	// the latency-only collectives, back to back.
	CommSeconds float64
	// ExposedSeconds is the part of CommSeconds that the step waits for
	// (not hidden behind backward), plus Input.StageSeconds.
	ExposedSeconds float64
	// StepSeconds = Input.StepSeconds + ExposedSeconds.
	StepSeconds float64
	// TokensPerS is the whole job's: Ranks · TokensPerStep / StepSeconds.
	TokensPerS float64
	// Efficiency is TokensPerS / (Ranks · baseline tokens/s of one worker).
	Efficiency float64
	// NoOverlapTokensPerS and FullOverlapTokensPerS are the same step with
	// Overlap 0 and 1: the bounds the prediction lies between.
	NoOverlapTokensPerS, FullOverlapTokensPerS float64
}

// Predict runs the model for one topology and scheme.
func Predict(in Input, t Topology, s Scheme) (Prediction, error) {
	if err := in.Validate(); err != nil {
		return Prediction{}, err
	}
	if err := t.validate(); err != nil {
		return Prediction{}, err
	}
	p := Prediction{Topology: t, Scheme: s, Ranks: t.Ranks()}
	costs := make([]float64, len(in.Buckets))
	for i, b := range in.Buckets {
		c, err := AllReduceSeconds(b, t, s, in.Intra, in.Inter)
		if err != nil {
			return Prediction{}, err
		}
		costs[i] = c
		p.CommSeconds += c
	}
	tail, err := AllReduceSeconds(0, t, s, in.Intra, in.Inter)
	if err != nil {
		return Prediction{}, err
	}
	tail *= float64(in.LatencyOnly)
	p.CommSeconds += tail
	if p.Ranks > 1 {
		tail += in.StageSeconds // not communication, but never hidden either
	}

	exposed := func(overlap float64) float64 {
		return exposedSeconds(in.StepSeconds*in.BackwardShare, in.Buckets, costs, overlap) + tail
	}
	tps := func(exp float64) float64 {
		return float64(p.Ranks) * in.TokensPerStep / (in.StepSeconds + exp)
	}
	p.ExposedSeconds = exposed(in.Overlap)
	p.StepSeconds = in.StepSeconds + p.ExposedSeconds
	p.TokensPerS = tps(p.ExposedSeconds)
	p.NoOverlapTokensPerS = tps(exposed(0))
	p.FullOverlapTokensPerS = tps(exposed(1))
	base := in.BaselineTokensPerS
	if base == 0 {
		base = in.TokensPerStep / in.StepSeconds
	}
	p.Efficiency = p.TokensPerS / (float64(p.Ranks) * base)
	return p, nil
}

// exposedSeconds schedules the buckets of one backward pass of length bwd:
// bucket k is ready when backward has produced its bytes (pulled towards
// the end of backward by 1−overlap) and starts when it is ready and the
// previous bucket is done. It returns how long after backward's end the
// last one finishes.
func exposedSeconds(bwd float64, bytes, costs []float64, overlap float64) float64 {
	var total float64
	for _, b := range bytes {
		total += b
	}
	var cum, end float64
	for k, b := range bytes {
		cum += b
		frac := 1.0 // of backward done when bucket k is final
		if total > 0 {
			frac = cum / total
		}
		ready := bwd * (1 - overlap*(1-frac))
		end = math.Max(end, ready) + costs[k]
	}
	return math.Max(0, end-bwd)
}

// FitLink turns two all-reduce timings over n ranks into a Link: t0 seconds
// for a small buffer of s0 bytes and t1 for a large one of s1 bytes. The
// bandwidth is the slope between them, so the fixed costs (which the model
// adds back as latency) are not counted twice; the latency is what the
// small buffer's time leaves per ring step. When noise makes the slope
// meaningless (t1 ≤ t0), busbw falls back to the large buffer's own and
// latency to the small buffer's time per step.
func FitLink(n int, s0, t0, s1, t1 float64) (Link, error) {
	if n < 2 || !(s1 > s0) || !(s0 >= 0) || !(t0 > 0) || !(t1 > 0) {
		return Link{}, fmt.Errorf("%w: fit over %d ranks of %v bytes in %v s and %v bytes in %v s", ErrInput, n, s0, t0, s1, t1)
	}
	f := float64(n)
	moved := 2 * (f - 1) / f // bytes each rank sends per byte of buffer
	steps := 2 * (f - 1)
	if t1 <= t0 {
		return Link{BusBW: moved * s1 / t1, Latency: t0 / steps}, nil
	}
	bw := moved * (s1 - s0) / (t1 - t0)
	lat := math.Max(0, t0-moved*s0/bw) / steps
	return Link{BusBW: bw, Latency: lat}, nil
}
