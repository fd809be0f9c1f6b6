package data

import (
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestTokenizerRoundTrip(t *testing.T) {
	var tok ByteTokenizer
	for _, s := range []string{"", "hello", "Ünïcödé ☃ text\n", "\x00\x01\xff"[:2]} {
		ids := tok.Encode(s)
		if len(ids) != len(s) {
			t.Errorf("Encode(%q) gave %d tokens, want %d", s, len(ids), len(s))
		}
		if got := tok.Decode(ids); got != s {
			t.Errorf("Decode(Encode(%q)) = %q", s, got)
		}
	}
	if got := tok.Decode([]int32{'a', 0xff, 'b', 300, -1}); got != "a\uFFFDb\uFFFD\uFFFD" {
		t.Errorf("lossy decode = %q", got)
	}
	if tok.VocabSize() != 256 {
		t.Errorf("VocabSize = %d", tok.VocabSize())
	}
}

func randomTokens(n, vocab int, seed uint64) []int32 {
	r := rand.New(rand.NewPCG(seed, 0))
	out := make([]int32, n)
	for i := range out {
		out[i] = int32(r.IntN(vocab))
	}
	return out
}

func TestShardRoundTrip(t *testing.T) {
	cases := []struct {
		name  string
		n     int
		vocab int
		width uint32
	}{
		{"empty", 0, 256, 2},
		{"bytes", 1000, 256, 2},
		{"max uint16 vocab", 500, 1 << 16, 2},
		{"wide vocab", 500, 100_000, 4},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "s.tok")
			tokens := randomTokens(tc.n, tc.vocab, 1)
			if tc.n > 0 {
				tokens[0] = int32(tc.vocab - 1) // the largest id must survive
			}
			if err := WriteShard(path, tokens, tc.vocab); err != nil {
				t.Fatal(err)
			}
			sh, err := ReadShard(path)
			if err != nil {
				t.Fatal(err)
			}
			if sh.Header.TokenWidth != tc.width || int(sh.Header.Vocab) != tc.vocab || int(sh.Header.Count) != tc.n {
				t.Errorf("header = %+v", sh.Header)
			}
			if len(sh.Tokens) != len(tokens) || (tc.n > 0 && !reflect.DeepEqual(sh.Tokens, tokens)) {
				t.Error("tokens differ after round trip")
			}
			st, _ := os.Stat(path)
			if st.Size() != int64(ShardHeaderSize+tc.n*int(tc.width)) {
				t.Errorf("file size %d", st.Size())
			}
		})
	}
}

func TestWriteShardRejectsOutOfRange(t *testing.T) {
	dir := t.TempDir()
	err := WriteShard(filepath.Join(dir, "s.tok"), []int32{1, 256}, 256)
	if !errors.Is(err, ErrTokenRange) {
		t.Fatalf("err = %v, want ErrTokenRange", err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("failed write left %d files", len(ents))
	}
}

// TestReadShardErrors corrupts a good shard in one way per case and checks
// the sentinel and that the message names the file, the problem and the fix.
func TestReadShardErrors(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.tok")
	if err := WriteShard(good, randomTokens(100, 200, 2), 200); err != nil {
		t.Fatal(err)
	}
	orig, _ := os.ReadFile(good)

	mutate := func(f func(b []byte) []byte) []byte {
		return f(append([]byte(nil), orig...))
	}
	cases := []struct {
		name     string
		file     []byte
		want     error
		contains []string
	}{
		{"bad magic", mutate(func(b []byte) []byte { copy(b, "GGUFxxxx"); return b }), ErrBadMagic, []string{"not a bmojo token shard", "bmojo data prepare"}},
		{"empty file", nil, ErrBadMagic, []string{"not a bmojo token shard"}},
		{"future version", mutate(func(b []byte) []byte { binary.LittleEndian.PutUint32(b[8:], 7); return b }), ErrVersion, []string{"version 7", "reads version 1", "bmojo data prepare"}},
		{"truncated header", orig[:20], ErrTruncated, []string{"header needs 32 bytes, file has 20"}},
		{"truncated payload", orig[:len(orig)-3], ErrTruncated, []string{"232 bytes", "229 bytes"}},
		{"trailing bytes", append(append([]byte(nil), orig...), 0, 0), ErrCorrupt, []string{"trailing"}},
		{"flipped payload byte", mutate(func(b []byte) []byte { b[ShardHeaderSize+10] ^= 0x01; return b }), ErrChecksum, []string{"CRC-32C", "bmojo data prepare"}},
		{"bad width", mutate(func(b []byte) []byte { binary.LittleEndian.PutUint32(b[16:], 3); return b }), ErrCorrupt, []string{"token width 3"}},
		{"token out of range", mutate(func(b []byte) []byte {
			// Lower the vocab below existing tokens; the checksum still
			// matches because it covers the payload only.
			binary.LittleEndian.PutUint32(b[12:], 5)
			return b
		}), ErrTokenRange, []string{"vocab size 5"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "bad.tok")
			if err := os.WriteFile(path, tc.file, 0o644); err != nil {
				t.Fatal(err)
			}
			_, err := ReadShard(path)
			if !errors.Is(err, tc.want) {
				t.Fatalf("ReadShard err = %v, want %v", err, tc.want)
			}
			for _, c := range append(tc.contains, path) {
				if !strings.Contains(err.Error(), c) {
					t.Errorf("error %q lacks %q", err, c)
				}
			}
			// The header-only reader agrees on header-level problems.
			if _, herr := ReadShardHeader(path); herr != nil && !errors.Is(herr, tc.want) {
				t.Errorf("ReadShardHeader err = %v, want nil or %v", herr, tc.want)
			}
		})
	}
}

func TestUnigramEntropy(t *testing.T) {
	cases := []struct {
		name   string
		tokens []int32
		vocab  int
		want   float64
	}{
		{"empty", nil, 4, 0},
		{"constant", []int32{3, 3, 3}, 4, 0},
		{"uniform over 4", []int32{0, 1, 2, 3}, 4, 1.3862943611198906},
		{"out of range ignored", []int32{0, 1, 9, -1}, 4, 0.6931471805599453},
	}
	for _, tc := range cases {
		if got := UnigramEntropy(tc.tokens, tc.vocab); abs(got-tc.want) > 1e-12 {
			t.Errorf("%s: got %v, want %v", tc.name, got, tc.want)
		}
	}
}

func abs(x float64) float64 {
	if x < 0 {
		return -x
	}
	return x
}

func FuzzParseShard(f *testing.F) {
	dir := f.TempDir()
	p := filepath.Join(dir, "seed.tok")
	if err := WriteShard(p, randomTokens(50, 256, 3), 256); err != nil {
		f.Fatal(err)
	}
	good, _ := os.ReadFile(p)
	f.Add(good)
	f.Add(good[:ShardHeaderSize])
	f.Add([]byte(ShardMagic))
	f.Fuzz(func(t *testing.T, b []byte) {
		sh, err := parseShard("fuzz.tok", b)
		if err != nil {
			return
		}
		for _, tok := range sh.Tokens {
			if tok < 0 || uint32(tok) >= sh.Header.Vocab {
				t.Fatalf("accepted token %d with vocab %d", tok, sh.Header.Vocab)
			}
		}
	})
}
