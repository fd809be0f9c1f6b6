// Package mqar generates multi-query associative recall (MQAR) data by the
// Zoology protocol of ../shared/design/experiments.md §1 and scores a
// model's predictions on it. It owns the data and the metric only: no model,
// no training, no I/O.
//
// An example is a function of (seed, setting, index) alone, so a training
// set or a test set is never stored: it is regenerated, identically, by
// every process that needs it (a sweep's cells, `bmojo eval --task mqar`).
package mqar

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
)

// Protocol constants (experiments.md §1).
const (
	// Vocab is V: token 0 is filler, keys come from [1, V/2), values from
	// [V/2, V).
	Vocab = 8192
	// Alpha is the power-law exponent of the query-slot weights
	// w(g) = (g+1)^(Alpha-1).
	Alpha = 0.01
	// Filler is the token of every position that is neither context nor a
	// query key (before noise).
	Filler = 0
	// Ignore is the target of every position that carries no label.
	Ignore = -1
	// TestSeedBase is the first test seed: train seeds are below it, test
	// seeds at or above it, so the two sets come from disjoint seeds.
	TestSeedBase = 1 << 31
)

// ErrSetting is wrapped by every error about a setting or a seed.
var ErrSetting = errors.New("mqar")

// Setting is one (T, K): sequence length and key–value pairs.
type Setting struct {
	T int `json:"seq_len"`
	K int `json:"kv"`
}

func (s Setting) String() string { return fmt.Sprintf("(%d,%d)", s.T, s.K) }

// Slots is S = (T − 2K)/2, the query slots of the setting.
func (s Setting) Slots() int { return (s.T - 2*s.K) / 2 }

// Validate checks the protocol's constraints: T even, V > T, 4K ≤ T, K ≥ 1,
// and K distinct keys and values available.
func (s Setting) Validate() error {
	switch {
	case s.K < 1:
		return fmt.Errorf("%w: setting %v: kv must be at least 1", ErrSetting, s)
	case s.T <= 0 || s.T%2 != 0:
		return fmt.Errorf("%w: setting %v: seq_len must be positive and even", ErrSetting, s)
	case s.T >= Vocab:
		return fmt.Errorf("%w: setting %v: seq_len must be below the vocabulary %d", ErrSetting, s, Vocab)
	case 4*s.K > s.T:
		return fmt.Errorf("%w: setting %v: 4·kv must be at most seq_len", ErrSetting, s)
	case s.K > Vocab/2-1:
		return fmt.Errorf("%w: setting %v: more keys than the %d key ids", ErrSetting, s, Vocab/2-1)
	}
	return nil
}

// Source is a set of examples: Seed picks the set (train seeds are below
// TestSeedBase, test seeds at or above it), Noise replaces filler inputs
// by uniform tokens (the Based variant). Example i of a setting is the same
// wherever and whenever it is generated.
type Source struct {
	Seed  uint64 `json:"seed"`
	Noise bool   `json:"noise"`
}

// Split names the side of TestSeedBase a seed must be on.
type Split int

const (
	Train Split = iota
	Test
)

// Check reports an error when the seed is on the wrong side of
// TestSeedBase for split, so train and test can never share a seed.
func (src Source) Check(split Split) error {
	if split == Train && src.Seed >= TestSeedBase {
		return fmt.Errorf("%w: train seed %d must be below %d", ErrSetting, src.Seed, uint64(TestSeedBase))
	}
	if split == Test && src.Seed < TestSeedBase {
		return fmt.Errorf("%w: test seed %d must be at least %d", ErrSetting, src.Seed, uint64(TestSeedBase))
	}
	return nil
}

// rng is example i's generator: PCG seeded from (seed, setting, i), so
// settings and examples of one seed draw independent streams.
func (src Source) rng(s Setting, i int) *rand.Rand {
	a := mix(src.Seed ^ mix(uint64(s.T)<<32|uint64(s.K)))
	return rand.New(rand.NewPCG(a, mix(a^uint64(i)+0x9e3779b97f4a7c15)))
}

// mix is splitmix64's finaliser.
func mix(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	return x ^ x>>31
}

// Example is one generated sequence with what the tests inspect.
type Example struct {
	Tokens  []int32 // T inputs
	Targets []int32 // T targets: Ignore except at the K query positions
	Keys    []int32 // K keys in context order
	Values  []int32 // K values, Values[i] pairs with Keys[i]
	Slots   []int   // Slots[i]: the query slot of Keys[i] (position 2K + 2·slot)
}

// Generate returns example i of setting s.
func (src Source) Generate(s Setting, i int) (Example, error) {
	if err := s.Validate(); err != nil {
		return Example{}, err
	}
	if i < 0 {
		return Example{}, fmt.Errorf("%w: example index %d is negative", ErrSetting, i)
	}
	e := Example{Tokens: make([]int32, s.T), Targets: make([]int32, s.T)}
	src.fill(s, i, e.Tokens, e.Targets, &e)
	return e, nil
}

// Fill writes examples first..first+n-1 of s into tokens and targets, row
// after row, each row T long; both slices must hold exactly n·T values.
func (src Source) Fill(s Setting, first, n int, tokens, targets []int32) error {
	if err := s.Validate(); err != nil {
		return err
	}
	if first < 0 || n < 0 {
		return fmt.Errorf("%w: examples [%d, %d+%d) out of range", ErrSetting, first, first, n)
	}
	if len(tokens) != n*s.T || len(targets) != n*s.T {
		return fmt.Errorf("%w: %d examples of %v need %d tokens and targets, got %d and %d",
			ErrSetting, n, s, n*s.T, len(tokens), len(targets))
	}
	for r := range n {
		src.fill(s, first+r, tokens[r*s.T:(r+1)*s.T], targets[r*s.T:(r+1)*s.T], nil)
	}
	return nil
}

// fill generates example i into tok and tgt (len T); e, when not nil, also
// receives the keys, values and slots.
func (src Source) fill(s Setting, i int, tok, tgt []int32, e *Example) {
	r := src.rng(s, i)
	K, S := s.K, s.Slots()
	keys := distinct(r, K, 1, Vocab/2)
	vals := distinct(r, K, Vocab/2, Vocab)
	slots := drawSlots(r, K, S)
	for p := range tok {
		tok[p], tgt[p] = Filler, Ignore
	}
	for k := range K {
		tok[2*k], tok[2*k+1] = keys[k], vals[k]
		q := 2*K + 2*slots[k]
		tok[q], tgt[q] = keys[k], vals[k]
	}
	if src.Noise {
		// Every filler input becomes a uniform token; the context (the first
		// 2K positions) and the query keys are never noised.
		for p := 2 * K; p < s.T; p++ {
			if tgt[p] == Ignore {
				tok[p] = int32(r.IntN(Vocab))
			}
		}
	}
	if e != nil {
		e.Keys, e.Values, e.Slots = keys, vals, slots
	}
}

// distinct draws k distinct ids uniformly from [lo, hi) (partial
// Fisher–Yates over a sparse swap map, so the draw is O(k)).
func distinct(r *rand.Rand, k, lo, hi int) []int32 {
	n := hi - lo
	swap := make(map[int]int, 2*k)
	at := func(j int) int {
		if v, ok := swap[j]; ok {
			return v
		}
		return j
	}
	out := make([]int32, k)
	for i := range k {
		j := i + r.IntN(n-i)
		vi, vj := at(i), at(j)
		swap[i], swap[j] = vj, vi
		out[i] = int32(lo + vj)
	}
	return out
}

// SlotWeight is w(g) = (g+1)^(α−1).
func SlotWeight(g int) float64 { return math.Pow(float64(g+1), Alpha-1) }

// drawSlots draws k distinct slots of S one at a time, each with
// probability proportional to SlotWeight among those left: exactly the
// protocol's sequential draw, O(k·S), which is small for every setting.
func drawSlots(r *rand.Rand, k, S int) []int {
	w := make([]float64, S)
	var total float64
	for g := range w {
		w[g] = SlotWeight(g)
		total += w[g]
	}
	out := make([]int, k)
	for i := range k {
		u := r.Float64() * total
		g, last := 0, -1
		for ; g < S; g++ {
			if w[g] == 0 {
				continue
			}
			last = g
			if u < w[g] {
				break
			}
			u -= w[g]
		}
		if g == S { // rounding left u past the end: take the last slot left
			g = last
		}
		out[i] = g
		total -= w[g]
		w[g] = 0
	}
	return out
}

// Score is the metric on a batch: for each example the fraction of its
// labelled (query) positions whose argmax logit equals the target, and the
// cross-entropy summed over them.
type Score struct {
	Examples int     // examples scored
	AccSum   float64 // Σ over examples of the fraction predicted exactly
	LossSum  float64 // Σ over labelled positions of the cross-entropy (nats)
	Labelled int     // labelled positions
}

// Accuracy is the mean over examples of the fraction predicted exactly.
func (s Score) Accuracy() float64 {
	if s.Examples == 0 {
		return 0
	}
	return s.AccSum / float64(s.Examples)
}

// Loss is the mean cross-entropy over labelled positions.
func (s Score) Loss() float64 {
	if s.Labelled == 0 {
		return 0
	}
	return s.LossSum / float64(s.Labelled)
}

// Add accumulates o into s.
func (s *Score) Add(o Score) {
	s.Examples += o.Examples
	s.AccSum += o.AccSum
	s.LossSum += o.LossSum
	s.Labelled += o.Labelled
}

// ScoreArgmax is ScoreLogits without the loss (LossSum stays 0): it reads
// only the labelled rows' argmax, V comparisons each, for callers that
// have the loss from elsewhere (the model computes it on the device).
func ScoreArgmax[F float32 | float64](logits []F, targets []int32, n, T, V int) (Score, error) {
	return score(logits, targets, n, T, V, false)
}

// ScoreLogits scores the first n rows of a batch: logits [rows·T, V] (row
// major), targets [rows·T]. Ties in the argmax go to the lowest id. A row
// with no labelled position is not counted.
func ScoreLogits[F float32 | float64](logits []F, targets []int32, n, T, V int) (Score, error) {
	return score(logits, targets, n, T, V, true)
}

func score[F float32 | float64](logits []F, targets []int32, n, T, V int, withLoss bool) (Score, error) {
	if n < 0 || T <= 0 || V <= 0 || len(targets) < n*T || len(logits) < n*T*V {
		return Score{}, fmt.Errorf("%w: score: %d rows of %d positions over %d ids need %d targets and %d logits, got %d and %d",
			ErrSetting, n, T, V, n*T, n*T*V, len(targets), len(logits))
	}
	return scoreRows(targets, n, T, V, withLoss, func(p int) []F { return logits[p*V : (p+1)*V] })
}

// ScoreLabelled is ScoreArgmax on the logits of the labelled positions
// alone (model.LabelledLogits): rows [len(pos), V], where rows[i] are the
// logits at position pos[i] of the batch. Every labelled position of the
// first n examples must be in pos.
func ScoreLabelled[F float32 | float64](rows []F, pos []int, targets []int32, n, T, V int) (Score, error) {
	if n < 0 || T <= 0 || V <= 0 || len(targets) < n*T || len(rows) != len(pos)*V {
		return Score{}, fmt.Errorf("%w: score: %d rows of %d positions over %d ids need %d targets and %d×%d logits, got %d and %d",
			ErrSetting, n, T, V, n*T, len(pos), V, len(targets), len(rows))
	}
	at := make(map[int]int, len(pos))
	for i, p := range pos {
		at[p] = i
	}
	var missing error
	sc, err := scoreRows(targets, n, T, V, false, func(p int) []F {
		i, ok := at[p]
		if !ok {
			missing = fmt.Errorf("%w: score: labelled position %d has no logits", ErrSetting, p)
			return make([]F, V)
		}
		return rows[i*V : (i+1)*V]
	})
	if err == nil {
		err = missing
	}
	return sc, err
}

// scoreRows scores the first n examples of targets [·T], reading the
// logits of labelled position p from row(p).
func scoreRows[F float32 | float64](targets []int32, n, T, V int, withLoss bool, row func(p int) []F) (Score, error) {
	var sc Score
	for r := range n {
		hit, lab := 0, 0
		for p := r * T; p < (r+1)*T; p++ {
			y := targets[p]
			if y < 0 {
				continue
			}
			if int(y) >= V {
				return Score{}, fmt.Errorf("%w: score: target %d at position %d is outside [0,%d)", ErrSetting, y, p, V)
			}
			row := row(p)
			best, mx := 0, row[0]
			for j, x := range row {
				if x > mx {
					best, mx = j, x
				}
			}
			if withLoss {
				var z float64
				for _, x := range row {
					z += math.Exp(float64(x - mx))
				}
				sc.LossSum += math.Log(z) - float64(row[y]-mx)
			}
			lab++
			if best == int(y) {
				hit++
			}
		}
		if lab > 0 {
			sc.Examples++
			sc.AccSum += float64(hit) / float64(lab)
			sc.Labelled += lab
		}
	}
	return sc, nil
}
