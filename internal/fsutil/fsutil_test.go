package fsutil

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
)

func TestWriteFileDigestMatchesContent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f.bin")
	content := make([]byte, 3<<20+17) // several buffer flushes and a tail
	for i := range content {
		content[i] = byte(i * 7)
	}
	d, err := WriteBytes(path, content)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(got)
	if string(got) != string(content) || d.Size != int64(len(content)) || d.SHA256 != hex.EncodeToString(sum[:]) {
		t.Fatalf("digest %+v does not describe the file written (%d bytes)", d, len(got))
	}
	if st, _ := os.Stat(path); st.Mode().Perm() != 0o644 {
		t.Fatalf("mode %v, want 0644", st.Mode().Perm())
	}
	if h, err := HashFile(path); err != nil || h != d {
		t.Fatalf("HashFile %+v (%v), WriteFile said %+v", h, err, d)
	}
}

func TestWriteFileFailureKeepsOldFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "f")
	if _, err := WriteBytes(path, []byte("old")); err != nil {
		t.Fatal(err)
	}
	boom := errors.New("boom")
	_, err := WriteFile(path, func(w io.Writer) error {
		_, _ = w.Write([]byte("half"))
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("got %v, want the writer's error", err)
	}
	if b, _ := os.ReadFile(path); string(b) != "old" {
		t.Fatalf("file now holds %q, want the old content", b)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Fatalf("directory holds %d entries, want only the old file (temporary removed)", len(ents))
	}
}
