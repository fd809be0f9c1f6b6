package scale

import (
	"fmt"

	"github.com/bmojo/bmojo/model"
)

// WireBytes is the size of one gradient element on the wire: float32, or
// bf16 with --bf16 (allreduce.Config.WireBF16).
func WireBytes(wire string) (int, error) {
	switch wire {
	case "fp32", "float32", "f32":
		return 4, nil
	case "bf16", "bfloat16":
		return 2, nil
	}
	return 0, fmt.Errorf("%w: wire %q (want fp32 or bf16)", ErrInput, wire)
}

// Buckets are c's gradient buckets in bytes on the wire, in the order a
// worker all-reduces them: one per layer from the last to the first (as
// backward finishes each, train.Engine.TrainStep), then the embedding and
// final norm (model.Layout.LayerRange(-1)).
func Buckets(c model.Config, bytesPerElem int) []float64 {
	l := model.NewLayout(c)
	var out []float64
	for i := len(c.Mixers) - 1; i >= -1; i-- {
		_, n := l.LayerRange(i)
		out = append(out, float64(n*bytesPerElem))
	}
	return out
}
