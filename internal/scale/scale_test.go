package scale

import (
	"errors"
	"math"
	"testing"

	"github.com/bmojo/bmojo/model"
)

// near reports whether got is within a relative 1e-9 of want.
func near(got, want float64) bool {
	return math.Abs(got-want) <= 1e-9*math.Max(1, math.Abs(want))
}

func TestAllReduceSecondsHandComputed(t *testing.T) {
	fast := Link{BusBW: 100e9, Latency: 1e-6}
	slow := Link{BusBW: 10e9, Latency: 1e-5}
	for _, tc := range []struct {
		name         string
		bytes        float64
		top          Topology
		scheme       Scheme
		intra, inter Link
		want         float64
	}{
		// 2·3/4 · 1e9 / 10e9
		{"flat one host", 1e9, Topology{4, 1}, Flat, Link{BusBW: 10e9}, slow, 0.15},
		// plus 2(n−1) = 6 steps of 10 µs
		{"flat one host with latency", 1e9, Topology{4, 1}, Flat, Link{BusBW: 10e9, Latency: 1e-5}, fast, 0.15 + 6e-5},
		// n = 4 over the slow link: 1.5 · 0.1 s + 6 · 10 µs
		{"flat two hosts waits for the slowest hop", 1e9, Topology{2, 2}, Flat, fast, slow, 0.15 + 6e-5},
		// inside: 2·1/2 · 1e9/100e9 + 2 · 1 µs; across: 2·1/2 · 1e9/10e9 + 2 · 10 µs
		{"hierarchical two hosts", 1e9, Topology{2, 2}, Hierarchical, fast, slow, 0.01 + 2e-6 + 0.1 + 2e-5},
		// 130m's float32 gradient, 8 GPUs × 4 hosts: flat 2·31/32 · 367e6 / 12.5e9
		{"flat 8x4", 367e6, Topology{8, 4}, Flat, Link{BusBW: 300e9}, Link{BusBW: 12.5e9}, 1.9375 * 367e6 / 12.5e9},
		// hierarchical: 1.75 · 367e6/300e9 + 1.5 · 367e6/12.5e9
		{"hierarchical 8x4", 367e6, Topology{8, 4}, Hierarchical, Link{BusBW: 300e9}, Link{BusBW: 12.5e9}, 1.75*367e6/300e9 + 1.5*367e6/12.5e9},
		{"one rank costs nothing", 1e9, Topology{1, 1}, Flat, slow, slow, 0},
		{"one rank costs nothing, hierarchical", 1e9, Topology{1, 1}, Hierarchical, slow, slow, 0},
		// 2(n−1) steps of latency, no bytes
		{"empty buffer is latency only", 0, Topology{3, 1}, Flat, Link{BusBW: 1e9, Latency: 1e-4}, slow, 4e-4},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := AllReduceSeconds(tc.bytes, tc.top, tc.scheme, tc.intra, tc.inter)
			if err != nil {
				t.Fatal(err)
			}
			if !near(got, tc.want) {
				t.Errorf("AllReduceSeconds = %.9g s, want %.9g s", got, tc.want)
			}
		})
	}
}

// TestHierarchicalEqualsFlat: with one host, or one worker per host, the
// two schemes are the same ring.
func TestHierarchicalEqualsFlat(t *testing.T) {
	intra := Link{BusBW: 300e9, Latency: 2e-6}
	inter := Link{BusBW: 11e9, Latency: 3e-5}
	for _, top := range []Topology{{1, 1}, {2, 1}, {8, 1}, {1, 2}, {1, 8}, {1, 3}} {
		t.Run(top.String(), func(t *testing.T) {
			f, err := AllReduceSeconds(367e6, top, Flat, intra, inter)
			if err != nil {
				t.Fatal(err)
			}
			h, err := AllReduceSeconds(367e6, top, Hierarchical, intra, inter)
			if err != nil {
				t.Fatal(err)
			}
			if !near(h, f) {
				t.Errorf("hierarchical %.9g s, flat %.9g s", h, f)
			}
		})
	}
	// And with both > 1 and a slower network, hierarchical is faster: it
	// sends 2(M−1)/M of the buffer over the network instead of 2(NM−1)/NM.
	f, _ := AllReduceSeconds(367e6, Topology{8, 2}, Flat, intra, inter)
	h, _ := AllReduceSeconds(367e6, Topology{8, 2}, Hierarchical, intra, inter)
	if !(h < f) {
		t.Errorf("8×2: hierarchical %.4g s is not faster than flat %.4g s", h, f)
	}
}

func base() Input {
	return Input{
		StepSeconds:   1,
		BackwardShare: 0.5,
		TokensPerStep: 1000,
		Buckets:       []float64{1e9, 1e9},
		Overlap:       1,
		Intra:         Link{BusBW: 1e9},
		Inter:         Link{BusBW: 1e9},
	}
}

func TestPredictHandComputed(t *testing.T) {
	two := Topology{2, 1}
	for _, tc := range []struct {
		name        string
		edit        func(*Input)
		top         Topology
		wantExposed float64
		wantComm    float64
	}{
		// Each bucket: 2·1/2 · 1e9 / 1e9 = 1 s; nothing hides.
		{"no overlap", func(in *Input) { in.Overlap = 0 }, two, 2, 2},
		// Backward 0.5 s; bucket 0 ready at 0.25, done 1.25; bucket 1
		// ready at 0.5, starts 1.25, done 2.25: 1.75 s after backward.
		{"full overlap, communication-bound", nil, two, 1.75, 2},
		// Ready at 0.5·(1 − 0.5·0.5) = 0.375, done 1.375, then 2.375.
		{"half overlap", func(in *Input) { in.Overlap = 0.5 }, two, 1.875, 2},
		// 0.1 s buckets: 0.25→0.35, 0.5→0.6: only the last bucket shows.
		{"full overlap, compute-bound", func(in *Input) { in.Buckets = []float64{0.1e9, 0.1e9} }, two, 0.1, 0.2},
		// Buckets of 0.1 s + 2 ms latency each, plus the loss sum's 2 ms.
		{"no overlap with latency and a loss sum", func(in *Input) {
			in.Buckets, in.Overlap, in.LatencyOnly = []float64{0.1e9, 0.1e9}, 0, 1
			in.Intra.Latency = 1e-3
		}, two, 0.206, 0.206},
		{"one worker", nil, Topology{1, 1}, 0, 0},
		// Staging is exposed on top of the 0.1 s last bucket.
		{"staging", func(in *Input) { in.Buckets, in.StageSeconds = []float64{0.1e9, 0.1e9}, 0.03 }, two, 0.13, 0.2},
		{"one worker stages nothing", func(in *Input) { in.StageSeconds = 0.03 }, Topology{1, 1}, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := base()
			if tc.edit != nil {
				tc.edit(&in)
			}
			p, err := Predict(in, tc.top, Flat)
			if err != nil {
				t.Fatal(err)
			}
			if !near(p.ExposedSeconds, tc.wantExposed) || !near(p.CommSeconds, tc.wantComm) {
				t.Errorf("exposed %.9g s, comm %.9g s; want %.9g, %.9g", p.ExposedSeconds, p.CommSeconds, tc.wantExposed, tc.wantComm)
			}
			wantStep := in.StepSeconds + tc.wantExposed
			if !near(p.StepSeconds, wantStep) {
				t.Errorf("step %.9g s, want %.9g", p.StepSeconds, wantStep)
			}
			wantTPS := float64(tc.top.Ranks()) * in.TokensPerStep / wantStep
			if !near(p.TokensPerS, wantTPS) {
				t.Errorf("tokens/s %.9g, want %.9g", p.TokensPerS, wantTPS)
			}
			if want := in.StepSeconds / wantStep; !near(p.Efficiency, want) {
				t.Errorf("efficiency %.9g, want %.9g", p.Efficiency, want)
			}
		})
	}
}

func TestPredictLimits(t *testing.T) {
	tops := []Topology{{1, 1}, {2, 1}, {8, 1}, {1, 4}, {8, 2}, {8, 8}, {4, 3}}
	schemes := []Scheme{Flat, Hierarchical}
	c, err := model.Preset("bmojo-130m")
	if err != nil {
		t.Fatal(err)
	}
	realistic := Input{
		StepSeconds: 0.0632, BackwardShare: 2.0 / 3, TokensPerStep: 8 * 2048,
		Buckets: Buckets(c, 4), Overlap: 0.8, LatencyOnly: 1,
		Intra: Link{BusBW: 7.7e9, Latency: 20e-6}, Inter: Link{BusBW: 11e9, Latency: 30e-6},
	}

	t.Run("one worker is efficiency 1", func(t *testing.T) {
		for _, s := range schemes {
			p, err := Predict(realistic, Topology{1, 1}, s)
			if err != nil {
				t.Fatal(err)
			}
			if p.Efficiency != 1 || p.ExposedSeconds != 0 || p.CommSeconds != 0 {
				t.Errorf("%s: efficiency %v, exposed %v s, comm %v s", s, p.Efficiency, p.ExposedSeconds, p.CommSeconds)
			}
		}
	})
	t.Run("infinite bandwidth and no latency is linear", func(t *testing.T) {
		in := realistic
		in.Intra, in.Inter = Link{BusBW: math.Inf(1)}, Link{BusBW: math.Inf(1)}
		for _, s := range schemes {
			for _, top := range tops {
				p, err := Predict(in, top, s)
				if err != nil {
					t.Fatal(err)
				}
				want := float64(top.Ranks()) * in.TokensPerStep / in.StepSeconds
				if !near(p.Efficiency, 1) || !near(p.TokensPerS, want) || p.ExposedSeconds != 0 {
					t.Errorf("%s %s: efficiency %v, tokens/s %v (want %v)", s, top, p.Efficiency, p.TokensPerS, want)
				}
			}
		}
	})
	t.Run("infinite bandwidth with latency is not linear", func(t *testing.T) {
		in := realistic
		in.Intra.BusBW, in.Inter.BusBW = math.Inf(1), math.Inf(1)
		p, err := Predict(in, Topology{8, 8}, Flat)
		if err != nil {
			t.Fatal(err)
		}
		if !(p.Efficiency < 1) {
			t.Errorf("efficiency %v with %v s per hop", p.Efficiency, in.Inter.Latency)
		}
	})
	t.Run("no overlap and full overlap bound the prediction", func(t *testing.T) {
		for _, s := range schemes {
			for _, top := range tops {
				for _, o := range []float64{0, 0.3, 0.8, 1} {
					in := realistic
					in.Overlap = o
					p, err := Predict(in, top, s)
					if err != nil {
						t.Fatal(err)
					}
					if p.NoOverlapTokensPerS > p.TokensPerS*(1+1e-12) || p.TokensPerS > p.FullOverlapTokensPerS*(1+1e-12) {
						t.Errorf("%s %s overlap %v: %v ≤ %v ≤ %v does not hold", s, top, o, p.NoOverlapTokensPerS, p.TokensPerS, p.FullOverlapTokensPerS)
					}
					// No overlap: the step is compute plus every collective.
					in.Overlap = 0
					q, _ := Predict(in, top, s)
					if !near(q.StepSeconds, in.StepSeconds+q.CommSeconds) {
						t.Errorf("%s %s no overlap: step %v s, compute + comm %v s", s, top, q.StepSeconds, in.StepSeconds+q.CommSeconds)
					}
					// Overlap hides at most backward, never the last bucket.
					if top.Ranks() > 1 && !(p.ExposedSeconds >= q.CommSeconds-in.StepSeconds*in.BackwardShare-1e-12) {
						t.Errorf("%s %s overlap %v: exposed %v s hides more than backward", s, top, o, p.ExposedSeconds)
					}
				}
			}
		}
	})
	t.Run("more bandwidth is never slower", func(t *testing.T) {
		for _, s := range schemes {
			for _, top := range tops {
				prev := 0.0
				for _, bw := range []float64{1e9, 3e9, 10e9, 50e9, 400e9} {
					in := realistic
					in.Intra.BusBW, in.Inter.BusBW = bw, bw/2
					p, err := Predict(in, top, s)
					if err != nil {
						t.Fatal(err)
					}
					if p.TokensPerS < prev {
						t.Errorf("%s %s: %v tokens/s at %v B/s, below %v at less", s, top, p.TokensPerS, bw, prev)
					}
					prev = p.TokensPerS
				}
			}
		}
	})
	t.Run("efficiency uses the baseline when given", func(t *testing.T) {
		in := realistic
		in.BaselineTokensPerS = 2 * in.TokensPerStep / in.StepSeconds // one worker alone ran twice as fast
		p, err := Predict(in, Topology{1, 1}, Flat)
		if err != nil {
			t.Fatal(err)
		}
		if !near(p.Efficiency, 0.5) {
			t.Errorf("efficiency %v, want 0.5", p.Efficiency)
		}
	})
}

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(*Input)
	}{
		{"zero step", func(in *Input) { in.StepSeconds = 0 }},
		{"NaN step", func(in *Input) { in.StepSeconds = math.NaN() }},
		{"infinite step", func(in *Input) { in.StepSeconds = math.Inf(1) }},
		{"backward share 0", func(in *Input) { in.BackwardShare = 0 }},
		{"backward share above 1", func(in *Input) { in.BackwardShare = 1.1 }},
		{"no tokens", func(in *Input) { in.TokensPerStep = 0 }},
		{"overlap above 1", func(in *Input) { in.Overlap = 1.5 }},
		{"negative overlap", func(in *Input) { in.Overlap = -0.1 }},
		{"no buckets", func(in *Input) { in.Buckets = nil }},
		{"negative bucket", func(in *Input) { in.Buckets = []float64{1, -1} }},
		{"zero busbw", func(in *Input) { in.Inter.BusBW = 0 }},
		{"negative latency", func(in *Input) { in.Intra.Latency = -1 }},
		{"negative latency-only count", func(in *Input) { in.LatencyOnly = -1 }},
		{"negative staging", func(in *Input) { in.StageSeconds = -1 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := base()
			tc.edit(&in)
			if _, err := Predict(in, Topology{2, 1}, Flat); !errors.Is(err, ErrInput) {
				t.Errorf("Predict: %v, want ErrInput", err)
			}
		})
	}
	if _, err := Predict(base(), Topology{0, 1}, Flat); !errors.Is(err, ErrInput) {
		t.Errorf("zero workers per host: %v, want ErrInput", err)
	}
	if _, err := Predict(base(), Topology{2, 1}, "tree"); !errors.Is(err, ErrInput) {
		t.Errorf("unknown scheme: %v, want ErrInput", err)
	}
	if err := base().Validate(); err != nil {
		t.Errorf("base input: %v", err)
	}
}

func TestBuckets(t *testing.T) {
	for _, tc := range []struct {
		preset string
		wire   string
	}{{"bmojo-tiny", "fp32"}, {"bmojo-130m", "fp32"}, {"bmojo-130m", "bf16"}, {"mamba-small", "fp32"}} {
		t.Run(tc.preset+"/"+tc.wire, func(t *testing.T) {
			c, err := model.Preset(tc.preset)
			if err != nil {
				t.Fatal(err)
			}
			w, err := WireBytes(tc.wire)
			if err != nil {
				t.Fatal(err)
			}
			b := Buckets(c, w)
			if len(b) != len(c.Mixers)+1 {
				t.Fatalf("%d buckets for %d layers, want one per layer and the embedding's", len(b), len(c.Mixers))
			}
			var sum float64
			for _, x := range b {
				sum += x
			}
			if want := float64(model.NewLayout(c).ParamCount() * w); sum != want {
				t.Errorf("buckets hold %v bytes, the gradient is %v", sum, want)
			}
			// The embedding (and final norm) goes last: backward finishes it last.
			if _, n := model.NewLayout(c).LayerRange(-1); b[len(b)-1] != float64(n*w) {
				t.Errorf("last bucket %v bytes, the embedding's range is %v", b[len(b)-1], n*w)
			}
		})
	}
	if _, err := WireBytes("fp8"); !errors.Is(err, ErrInput) {
		t.Errorf("WireBytes(fp8): %v, want ErrInput", err)
	}
}

func TestFitLink(t *testing.T) {
	// A link of 2 GB/s busbw and 50 µs per step, sampled at 4 KiB and 64 MiB
	// over 4 ranks, fits back to itself.
	want := Link{BusBW: 2e9, Latency: 50e-6}
	top := Topology{4, 1}
	t0, _ := AllReduceSeconds(4096, top, Flat, want, want)
	t1, _ := AllReduceSeconds(64<<20, top, Flat, want, want)
	got, err := FitLink(4, 4096, t0, 64<<20, t1)
	if err != nil {
		t.Fatal(err)
	}
	if !near(got.BusBW, want.BusBW) || !near(got.Latency, want.Latency) {
		t.Errorf("FitLink = %+v, want %+v", got, want)
	}
	// Noise that makes the large buffer faster: busbw from it alone.
	got, err = FitLink(2, 4096, 2e-3, 1<<20, 1e-3)
	if err != nil {
		t.Fatal(err)
	}
	if !near(got.BusBW, float64(1<<20)/1e-3) || !near(got.Latency, 1e-3) {
		t.Errorf("noisy FitLink = %+v", got)
	}
	for _, bad := range [][5]float64{{1, 0, 1, 2, 2}, {2, 8, 1, 4, 2}, {2, 0, 0, 4, 2}, {2, 0, 1, 4, math.NaN()}} {
		if _, err := FitLink(int(bad[0]), bad[1], bad[2], bad[3], bad[4]); !errors.Is(err, ErrInput) {
			t.Errorf("FitLink%v: %v, want ErrInput", bad, err)
		}
	}
}
