package kernels

import (
	"math"
	"testing"
)

func TestRoundBF16(t *testing.T) {
	for _, c := range []struct{ in, want float32 }{
		{1, 1},
		{math.Float32frombits(0x3f808000), 1}, // tie: to even (down)
		{math.Float32frombits(0x3f818000), math.Float32frombits(0x3f820000)},   // tie: to even (up)
		{math.Float32frombits(0x3f808001), math.Float32frombits(0x3f810000)},   // above the tie
		{-math.Float32frombits(0x3f80ffff), -math.Float32frombits(0x3f810000)}, // sign kept
	} {
		if got := RoundBF16(c.in); got != c.want {
			t.Errorf("RoundBF16(%#x) = %#x, want %#x", math.Float32bits(c.in), math.Float32bits(got), math.Float32bits(c.want))
		}
	}
}
