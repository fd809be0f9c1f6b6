package mqar

import (
	"errors"
	"math"
	"testing"

	"gonum.org/v1/gonum/stat/distuv"
)

func TestSettingValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		s    Setting
		ok   bool
	}{
		{"zoology smallest", Setting{64, 4}, true},
		{"based hardest", Setting{1024, 256}, true},
		{"4K equals T", Setting{64, 16}, true},
		{"4K above T", Setting{64, 17}, false},
		{"odd T", Setting{65, 4}, false},
		{"T not below V", Setting{8192, 4}, false},
		{"no pairs", Setting{64, 0}, false},
		{"negative", Setting{-64, 4}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.s.Validate()
			if (err == nil) != tc.ok {
				t.Fatalf("Validate(%v) = %v, want ok=%v", tc.s, err, tc.ok)
			}
			if err != nil && !errors.Is(err, ErrSetting) {
				t.Fatalf("error %v does not wrap ErrSetting", err)
			}
		})
	}
}

// TestExampleStructure checks every rule of the protocol that holds per
// example, over many examples of several settings, with and without noise.
func TestExampleStructure(t *testing.T) {
	for _, s := range []Setting{{64, 4}, {64, 16}, {256, 64}, {1024, 256}} {
		for _, noise := range []bool{false, true} {
			src := Source{Seed: 7, Noise: noise}
			for i := range 50 {
				e, err := src.Generate(s, i)
				if err != nil {
					t.Fatal(err)
				}
				checkExample(t, s, e, noise)
			}
		}
	}
}

func checkExample(t *testing.T, s Setting, e Example, noise bool) {
	t.Helper()
	K := s.K
	if len(e.Tokens) != s.T || len(e.Targets) != s.T || len(e.Keys) != K || len(e.Values) != K || len(e.Slots) != K {
		t.Fatalf("%v: lengths tokens %d targets %d keys %d values %d slots %d", s, len(e.Tokens), len(e.Targets), len(e.Keys), len(e.Values), len(e.Slots))
	}
	seenK, seenV, seenS := map[int32]bool{}, map[int32]bool{}, map[int]bool{}
	for i := range K {
		k, v := e.Keys[i], e.Values[i]
		if k < 1 || k >= Vocab/2 {
			t.Fatalf("%v: key %d outside [1, V/2)", s, k)
		}
		if v < Vocab/2 || v >= Vocab {
			t.Fatalf("%v: value %d outside [V/2, V)", s, v)
		}
		if seenK[k] || seenV[v] || seenS[e.Slots[i]] {
			t.Fatalf("%v: repeated key %d, value %d or slot %d", s, k, v, e.Slots[i])
		}
		seenK[k], seenV[v], seenS[e.Slots[i]] = true, true, true
		if e.Tokens[2*i] != k || e.Tokens[2*i+1] != v {
			t.Fatalf("%v: context pair %d is (%d,%d), want (%d,%d)", s, i, e.Tokens[2*i], e.Tokens[2*i+1], k, v)
		}
		if g := e.Slots[i]; g < 0 || g >= s.Slots() {
			t.Fatalf("%v: slot %d outside [0,%d)", s, g, s.Slots())
		}
	}
	labelled := 0
	for p, y := range e.Targets {
		if y == Ignore {
			if !noise && p >= 2*K && e.Tokens[p] != Filler {
				t.Fatalf("%v: unlabelled query-region position %d holds %d, want filler", s, p, e.Tokens[p])
			}
			continue
		}
		labelled++
		if p < 2*K || (p-2*K)%2 != 0 {
			t.Fatalf("%v: target at position %d, which is not a query slot", s, p)
		}
		i := -1
		for j, k := range e.Keys {
			if k == e.Tokens[p] {
				i = j
			}
		}
		if i < 0 || e.Values[i] != y || 2*K+2*e.Slots[i] != p {
			t.Fatalf("%v: position %d holds %d with target %d: not a query key with its value at its slot", s, p, e.Tokens[p], y)
		}
	}
	if labelled != K {
		t.Fatalf("%v: %d labelled positions, want K = %d", s, labelled, K)
	}
}

// TestNoiseOnlyTouchesFiller: the noise variant has the same keys, values,
// slots and targets as the plain one, and its filler is no longer filler.
func TestNoiseOnlyTouchesFiller(t *testing.T) {
	s := Setting{256, 16}
	plain, noisy := Source{Seed: 3}, Source{Seed: 3, Noise: true}
	changed := 0
	for i := range 20 {
		a, _ := plain.Generate(s, i)
		b, _ := noisy.Generate(s, i)
		for p := range a.Tokens {
			if a.Targets[p] != b.Targets[p] {
				t.Fatalf("example %d: target at %d differs with noise", i, p)
			}
			if p < 2*s.K || a.Targets[p] != Ignore {
				if a.Tokens[p] != b.Tokens[p] {
					t.Fatalf("example %d: noise changed the context or a query key at %d", i, p)
				}
			} else if b.Tokens[p] != Filler {
				changed++
			}
		}
	}
	// 20 examples × 224 filler positions; a uniform draw is 0 with p = 1/V.
	if want := 20 * (s.T - 2*s.K - s.K) * 99 / 100; changed < want {
		t.Fatalf("noise changed %d filler positions, want at least %d", changed, want)
	}
}

// chiSquare returns the p-value of observed counts against expected
// probabilities, merging the tail bins until each expects at least 5.
func chiSquare(obs []int, prob []float64, n int) (stat float64, df int, p float64) {
	var o, e float64
	bins := 0
	for g := range obs {
		o += float64(obs[g])
		e += prob[g] * float64(n)
		if e >= 5 || g == len(obs)-1 {
			stat += (o - e) * (o - e) / e
			bins++
			o, e = 0, 0
		}
	}
	df = bins - 1
	return stat, df, distuv.ChiSquared{K: float64(df)}.Survival(stat)
}

// TestQueryDistancesFollowThePowerLaw checks the slot draw against the
// protocol's exact law. The first key's slot is the first draw, so it is
// distributed as w(g)/Σw; the second key's slot has the marginal
// Σ_{i≠g} p_i·w(g)/(W − w(i)). Both are tested by chi-square on a fixed
// seed (a uniform or reversed draw gives p-values below 1e-100).
func TestQueryDistancesFollowThePowerLaw(t *testing.T) {
	s := Setting{128, 8}
	S := s.Slots()
	w := make([]float64, S)
	var W float64
	for g := range w {
		w[g] = SlotWeight(g)
		W += w[g]
	}
	p1 := make([]float64, S)
	for g := range p1 {
		p1[g] = w[g] / W
	}
	p2 := make([]float64, S)
	for g := range p2 {
		for i := range S {
			if i != g {
				p2[g] += p1[i] * w[g] / (W - w[i])
			}
		}
	}
	const n = 20000
	first, second := make([]int, S), make([]int, S)
	src := Source{Seed: 11}
	for i := range n {
		e, err := src.Generate(s, i)
		if err != nil {
			t.Fatal(err)
		}
		first[e.Slots[0]]++
		second[e.Slots[1]]++
	}
	for _, c := range []struct {
		name string
		obs  []int
		prob []float64
	}{{"first draw", first, p1}, {"second draw", second, p2}} {
		stat, df, p := chiSquare(c.obs, c.prob, n)
		t.Logf("%s: chi2 = %.1f on %d df, p = %.3g", c.name, stat, df, p)
		if p < 1e-4 {
			t.Errorf("%s: slot counts do not follow the power law: chi2 = %.1f on %d df, p = %.3g", c.name, stat, df, p)
		}
	}
	// The law favours near queries: the mean distance from a key to its
	// query must be well below the uniform law's.
	var near, far int
	for g := range S {
		if g < S/4 {
			near += first[g]
		} else if g >= 3*S/4 {
			far += first[g]
		}
	}
	if near <= far {
		t.Errorf("first-quarter slots drawn %d times, last-quarter %d: no power-law bias towards near queries", near, far)
	}
}

// TestKeysAndValuesUniform: key and value ids cover their halves evenly
// (chi-square over 16 equal bins of each half).
func TestKeysAndValuesUniform(t *testing.T) {
	s := Setting{256, 64}
	const bins = 16
	kc, vc := make([]int, bins), make([]int, bins)
	n := 0
	src := Source{Seed: 5}
	for i := range 400 {
		e, _ := src.Generate(s, i)
		for j := range e.Keys {
			kc[int(e.Keys[j]-1)*bins/(Vocab/2-1)]++
			vc[int(e.Values[j]-Vocab/2)*bins/(Vocab/2)]++
			n++
		}
	}
	uni := make([]float64, bins)
	for i := range uni {
		uni[i] = 1.0 / bins
	}
	for name, c := range map[string][]int{"keys": kc, "values": vc} {
		if _, _, p := chiSquare(c, uni, n); p < 1e-4 {
			t.Errorf("%s are not uniform over their half: counts %v (p = %.3g)", name, c, p)
		}
	}
}

// TestSeedsAndDeterminism: examples are a function of (seed, setting,
// index); train and test seeds are refused on the wrong side, and a train
// and a test set share no example.
func TestSeedsAndDeterminism(t *testing.T) {
	s := Setting{64, 4}
	train, test := Source{Seed: 1}, Source{Seed: TestSeedBase + 1}
	if err := train.Check(Train); err != nil {
		t.Fatal(err)
	}
	if err := test.Check(Test); err != nil {
		t.Fatal(err)
	}
	if train.Check(Test) == nil || test.Check(Train) == nil {
		t.Fatal("a seed was accepted for the other split")
	}
	const n = 2000
	tok, tgt := make([]int32, n*s.T), make([]int32, n*s.T)
	if err := train.Fill(s, 0, n, tok, tgt); err != nil {
		t.Fatal(err)
	}
	seen := map[[8]int32]bool{}
	for r := range n {
		var ctx [8]int32
		copy(ctx[:], tok[r*s.T:])
		seen[ctx] = true
		if r%97 == 0 { // Fill and Generate agree
			e, _ := train.Generate(s, r)
			for p := range s.T {
				if e.Tokens[p] != tok[r*s.T+p] || e.Targets[p] != tgt[r*s.T+p] {
					t.Fatalf("Fill and Generate differ at example %d position %d", r, p)
				}
			}
		}
	}
	if len(seen) != n {
		t.Fatalf("%d distinct contexts among %d train examples", len(seen), n)
	}
	for i := range n {
		e, _ := test.Generate(s, i)
		var ctx [8]int32
		copy(ctx[:], e.Tokens)
		if seen[ctx] {
			t.Fatalf("test example %d repeats a train example's context", i)
		}
	}
	a, _ := train.Generate(s, 5)
	b, _ := Source{Seed: 1}.Generate(s, 5)
	for p := range a.Tokens {
		if a.Tokens[p] != b.Tokens[p] {
			t.Fatal("the same (seed, setting, index) gave two examples")
		}
	}
	if err := train.Fill(s, 0, 2, tok[:10], tgt[:10]); err == nil {
		t.Fatal("Fill accepted slices of the wrong length")
	}
}

// TestScoreAveragesOverExamples: accuracy is the mean over examples of the
// per-example fraction, not the fraction over all query positions.
func TestScoreAveragesOverExamples(t *testing.T) {
	const T, V = 4, 5
	logits := make([]float32, 2*T*V)
	targets := []int32{Ignore, 3, Ignore, Ignore, 1, 2, 4, Ignore}
	set := func(p, id int) { logits[p*V+id] = 10 }
	set(1, 3) // example 0: its one query right
	set(4, 0) // example 1: its three queries wrong
	set(5, 0)
	set(6, 0)
	sc, err := ScoreLogits(logits, targets, 2, T, V)
	if err != nil {
		t.Fatal(err)
	}
	if sc.Examples != 2 || sc.Labelled != 4 {
		t.Fatalf("scored %d examples, %d positions; want 2 and 4", sc.Examples, sc.Labelled)
	}
	if got := sc.Accuracy(); math.Abs(got-0.5) > 1e-12 {
		t.Fatalf("accuracy %v, want 0.5 (1/1 and 0/3 averaged over examples; 0.25 would average positions)", got)
	}
	// Uniform logits: loss log V, argmax the lowest id.
	uni := make([]float32, T*V)
	sc, _ = ScoreLogits(uni, []int32{0, Ignore, 2, Ignore}, 1, T, V)
	if math.Abs(sc.Loss()-math.Log(V)) > 1e-9 || math.Abs(sc.Accuracy()-0.5) > 1e-12 {
		t.Fatalf("uniform logits: loss %v accuracy %v, want log 5 and 0.5", sc.Loss(), sc.Accuracy())
	}
	am, err := ScoreArgmax(logits, targets, 2, T, V)
	if err != nil || am.Accuracy() != 0.5 || am.LossSum != 0 || am.Labelled != 4 {
		t.Fatalf("ScoreArgmax: %+v %v; want accuracy 0.5 and no loss", am, err)
	}
	if _, err := ScoreLogits(uni, []int32{9, Ignore, Ignore, Ignore}, 1, T, V); err == nil {
		t.Fatal("a target outside the vocabulary was scored")
	}
	if _, err := ScoreLogits(uni, []int32{0}, 1, T, V); err == nil {
		t.Fatal("short targets were scored")
	}
}
