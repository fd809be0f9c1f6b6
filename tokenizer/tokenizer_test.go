package tokenizer

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
)

// conformance texts: every implementation must round-trip them exactly.
var roundTrip = []string{
	"",
	"Hello world",
	"I'm sure you'll say they've done it. DON'T",
	"a  b\n\n\nc   d\t\te\r\n  \n",
	"   leading and trailing   ",
	"3.14159, 1,000,000 and 12345678901234567890",
	"naïve café Zürich Ελληνικά русский 日本語 عربى",
	"🙂 👍🏽 👨‍👩‍👧‍👦 🇫🇷",
	"<|endoftext|> in the middle <|endoftext|>",
	strings.Repeat("0", 1000),
	strings.Repeat(" ", 300) + "x" + strings.Repeat("\n", 300),
}

// implementations returns every Tokenizer this package has, by name.
func implementations(t *testing.T) map[string]Tokenizer {
	t.Helper()
	out := map[string]Tokenizer{}
	for _, spec := range []string{Bytes, GPT2, smallBPE(t, nil, false)} {
		tok, err := New(spec)
		if err != nil {
			t.Fatal(err)
		}
		out[strings.SplitN(tok.Name(), "@", 2)[0]] = tok
	}
	return out
}

// TestConformance runs one body against every implementation: round trip,
// ids in range, the end-of-text text never becoming the EOT id in Encode,
// EncodeSpecial making it one, and unknown ids decoding to U+FFFD.
func TestConformance(t *testing.T) {
	for name, tok := range implementations(t) {
		t.Run(name, func(t *testing.T) {
			eot, hasEOT := tok.EOT()
			for _, text := range roundTrip {
				ids, err := tok.Encode(text)
				if err != nil {
					t.Fatalf("Encode(%q): %v", text, err)
				}
				for _, id := range ids {
					if id < 0 || int(id) >= tok.VocabSize() {
						t.Fatalf("Encode(%q): id %d outside [0, %d)", text, id, tok.VocabSize())
					}
					if hasEOT && id == eot {
						t.Fatalf("Encode(%q) produced the EOT id %d", text, eot)
					}
				}
				if got := tok.Decode(ids); got != text {
					t.Fatalf("Decode(Encode(%q)) = %q", text, got)
				}
				var b []byte
				for _, id := range ids {
					b = append(b, tok.TokenBytes(id)...)
				}
				if string(b) != text {
					t.Fatalf("TokenBytes of Encode(%q) = %q", text, b)
				}
			}
			special, err := EncodeSpecial(tok, "a"+EndOfText+"b")
			if err != nil {
				t.Fatal(err)
			}
			if hasEOT != slices.Contains(special, eot) || tok.Decode(special) != "a"+EndOfText+"b" {
				t.Fatalf("EncodeSpecial(a<|endoftext|>b) = %v (has EOT %v, id %d)", special, hasEOT, eot)
			}
			if got := tok.Decode([]int32{-1, int32(tok.VocabSize())}); got != "\uFFFD\uFFFD" {
				t.Fatalf("Decode of ids outside the vocabulary = %q, want two U+FFFD", got)
			}
		})
	}
}

// TestConcurrentEncode: one tokenizer shared by goroutines gives every one
// the ids a lone caller gets (data prepare shares it between workers).
func TestConcurrentEncode(t *testing.T) {
	for name, tok := range implementations(t) {
		t.Run(name, func(t *testing.T) {
			text := strings.Join(roundTrip, "\n")
			want, err := tok.Encode(text)
			if err != nil {
				t.Fatal(err)
			}
			var wg sync.WaitGroup
			errs := make(chan error, 8)
			for range 8 {
				wg.Go(func() {
					for range 5 {
						got, err := tok.Encode(text)
						if err != nil || !slices.Equal(got, want) {
							errs <- fmt.Errorf("concurrent Encode: %v, equal %v", err, slices.Equal(got, want))
							return
						}
					}
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
		})
	}
}

func TestNewNames(t *testing.T) {
	for _, spec := range []string{"", "byte", "bytes", "BYTES"} {
		tok, err := New(spec)
		if err != nil || tok.Name() != Bytes {
			t.Errorf("New(%q) = %v, %v; want the byte tokenizer", spec, tok, err)
		}
	}
	for in, want := range map[string]string{"": Bytes, "byte": Bytes, "bytes": Bytes, "gpt2": GPT2, "r50k_base": GPT2, "tokenizer.json@sha256:00": "tokenizer.json@sha256:00"} {
		if got := CanonicalName(in); got != want {
			t.Errorf("CanonicalName(%q) = %q, want %q", in, got, want)
		}
	}
	if _, err := New("gpt3"); !errors.Is(err, ErrUnknown) {
		t.Errorf("New(gpt3): %v, want ErrUnknown", err)
	}
}

func TestPadVocab(t *testing.T) {
	for n, want := range map[int]int{1: 64, 64: 64, 65: 128, 256: 256, 50257: 50304, 50280: 50304, 50304: 50304} {
		if got := PadVocab(n); got != want {
			t.Errorf("PadVocab(%d) = %d, want %d", n, got, want)
		}
	}
}
