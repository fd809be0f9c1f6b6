// Package fsutil is the one place bmojo makes a file durable: written under
// a temporary name, fsynced, renamed into place and its directory fsynced,
// so a reader (or a restart after a crash) sees either the old complete
// file or the new complete file, never a partial one. It also hashes what it
// writes, so a caller that records a file's SHA-256 (a checkpoint manifest)
// never reads the file back to learn it.
//
// It owns no file format and imports nothing of bmojo: safetensors, data
// shards, dataset manifests and checkpoints all write through it.
package fsutil

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
)

// Digest is what a file holds: its length in bytes and the SHA-256 of its
// content, as lower-case hex.
type Digest struct {
	Size   int64
	SHA256 string
}

// digestWriter counts and hashes the bytes written through it.
type digestWriter struct {
	h hash.Hash
	n int64
}

func (d *digestWriter) Write(p []byte) (int, error) {
	d.h.Write(p) // a hash.Hash never returns an error
	d.n += int64(len(p))
	return len(p), nil
}

func (d *digestWriter) digest() Digest {
	return Digest{Size: d.n, SHA256: hex.EncodeToString(d.h.Sum(nil))}
}

// WriteFile writes path atomically and durably with the bytes write produces
// and returns their Digest. The bytes go through a 1 MiB buffer to a
// temporary file in path's directory (a rename is atomic only within one
// filesystem), which is fsynced, made 0644 (files are meant to be shared),
// renamed over path, and the directory is fsynced so that the rename itself
// survives a crash. On any error the temporary file is removed and path is
// left as it was.
func WriteFile(path string, write func(w io.Writer) error) (d Digest, err error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	tmp, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return Digest{}, fmt.Errorf("write %s: %w", path, err)
	}
	tmpName := tmp.Name()
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmpName)
		}
	}()
	dw := &digestWriter{h: sha256.New()}
	w := bufio.NewWriterSize(io.MultiWriter(tmp, dw), 1<<20)
	if err := write(w); err != nil {
		return Digest{}, fmt.Errorf("write %s: %w", path, err)
	}
	if err := w.Flush(); err != nil {
		return Digest{}, fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		return Digest{}, fmt.Errorf("write %s: fsync: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return Digest{}, fmt.Errorf("write %s: close: %w", path, err)
	}
	if err := os.Chmod(tmpName, 0o644); err != nil {
		return Digest{}, fmt.Errorf("write %s: chmod: %w", path, err)
	}
	if err := os.Rename(tmpName, path); err != nil {
		return Digest{}, fmt.Errorf("write %s: rename: %w", path, err)
	}
	if err := SyncDir(dir); err != nil {
		// The file is complete under its name; only its durability across
		// a crash is in doubt. Report it, and do not remove the file.
		return Digest{}, fmt.Errorf("write %s: %w", path, err)
	}
	return dw.digest(), nil
}

// WriteBytes is WriteFile for content already in memory.
func WriteBytes(path string, b []byte) (Digest, error) {
	return WriteFile(path, func(w io.Writer) error {
		_, err := w.Write(b)
		return err
	})
}

// SyncDir fsyncs directory dir, making the creation, removal or renaming of
// its entries durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("fsync directory: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	return nil
}

// Hash returns the Digest of everything r yields.
func Hash(r io.Reader) (Digest, error) {
	dw := &digestWriter{h: sha256.New()}
	if _, err := io.Copy(dw, r); err != nil {
		return Digest{}, err
	}
	return dw.digest(), nil
}

// HashFile returns the Digest of the file at path, streaming it.
func HashFile(path string) (Digest, error) {
	f, err := os.Open(path)
	if err != nil {
		return Digest{}, err
	}
	defer f.Close()
	d, err := Hash(f)
	if err != nil {
		return Digest{}, fmt.Errorf("hash %s: %w", path, err)
	}
	return d, nil
}

// HashBytes returns the Digest of b.
func HashBytes(b []byte) Digest {
	s := sha256.Sum256(b)
	return Digest{Size: int64(len(b)), SHA256: hex.EncodeToString(s[:])}
}
