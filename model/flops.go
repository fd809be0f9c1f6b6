package model

import (
	"fmt"
	"strings"
)

// FLOPsPerToken is the model FLOPs of one training token (forward and
// backward) for sequences of length T, the numerator of MFU:
//
//	6·(Σ linear weights + V·d)              matrix products (the tied head is V·d),
//	                                         except: W_k and W_v of a layer with a
//	                                         fading window also make k_f, v_f from the
//	                                         SSM output (12·); the innovation predictor
//	                                         has no input gradient (4·, or 2· with λ = 0)
//	+ Σ_attention layers 12·H·D·k̄           scores and values, forward ×3, where k̄
//	                                         is the mean number of keys a query sees
//	                                         (context + fading + memory, exact for T)
//	+ Σ_SSM layers (24·E·N + 6·E·K)         selective scan and causal conv
//
// Elementwise work (norms, activations, softmax) is not counted, as usual.
func FLOPsPerToken(c Config, T int) float64 {
	l := NewLayout(c)
	f := 6 * float64(c.VocabSize*c.DModel)
	for _, t := range l.Tensors {
		if !t.Decay || len(t.Shape) != 2 || strings.HasSuffix(t.Name, "conv.weight") {
			continue
		}
		mult := 6.0
		var layer int
		fmt.Sscanf(t.Name, "layers.%d.", &layer)
		switch {
		case strings.HasSuffix(t.Name, "attn.predictor.weight"):
			mult = 2
			if c.InnovationLoss > 0 {
				mult = 4
			}
		case (strings.HasSuffix(t.Name, "attn.k_proj.weight") || strings.HasSuffix(t.Name, "attn.v_proj.weight")) &&
			c.Mixers[layer] == MixerBMOJO && c.FadingWindow > 0:
			mult = 12
		}
		f += mult * float64(t.Size())
	}
	for _, mx := range c.Mixers {
		switch mx {
		case MixerMamba:
			f += 24*float64(c.DInner*c.DState) + 6*float64(c.DInner*c.DConv)
		case MixerAttention, MixerBMOJO:
			keys := meanKeys(c, mx, T)
			f += 12 * float64(c.NHead*c.HeadDim) * keys
			if mx == MixerBMOJO {
				f += 24*float64(c.DInner*c.DState) + 6*float64(c.DInner*c.DConv)
			}
		}
	}
	return f
}

// meanKeys is the mean over positions t < T of the keys one query attends
// to, with the key sets of kernels.Backend.Attention.
func meanKeys(c Config, mx string, T int) float64 {
	if T <= 0 {
		return 0
	}
	var sum float64
	for t := 0; t < T; t++ {
		k := min(t+1, c.Window)
		if mx == MixerBMOJO {
			if c.FadingWindow > 0 {
				k += max(0, min(c.FadingWindow, t+1-c.Window))
			}
			if c.HasMemory() {
				visible := min(T/c.Chunk, max(0, t/c.Chunk-c.MemoryDelay()+1))
				k += min(c.Memory, visible*c.SelectPerChunk)
			}
		}
		sum += float64(k)
	}
	return sum / float64(T)
}
