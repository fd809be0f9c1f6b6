// Command oci-image writes a one-layer container image as a tarball that
// `ctr images import` (and `docker load`) read, with no Docker daemon and no
// registry: static binaries at the paths given, /etc/passwd and /etc/group
// naming root and nonroot (65532, as distroless' nonroot images), and the
// entrypoint and user given. tests/k8s builds the bmojo, etcd and pause
// images with it (scripts/kube-node.sh).
//
//	oci-image -tag bmojo:dev -entrypoint /usr/local/bin/bmojo -user 65532:65532 \
//	          -add /usr/local/bin/bmojo=./bmojo -o bmojo.tar
package main

import (
	"archive/tar"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/hashicorp/go-hclog"
)

// adds is the repeated -add DST=SRC flag.
type adds map[string]string

func (a adds) String() string { return fmt.Sprint(map[string]string(a)) }

func (a adds) Set(s string) error {
	dst, src, ok := strings.Cut(s, "=")
	if !ok || !path.IsAbs(dst) || src == "" {
		return fmt.Errorf("want /path/in/image=file, got %q", s)
	}
	a[path.Clean(dst)] = src
	return nil
}

func main() {
	log := hclog.New(&hclog.LoggerOptions{Name: "oci-image", Output: os.Stderr})
	files := adds{}
	out := flag.String("o", "", "output tarball (required)")
	tag := flag.String("tag", "", "image name with a tag, e.g. bmojo:dev (required)")
	entry := flag.String("entrypoint", "", "entrypoint: a path in the image, then space-separated arguments")
	user := flag.String("user", "", "user:group the image runs as, e.g. 65532:65532")
	flag.Var(files, "add", "DST=SRC: put file SRC at DST in the image, mode 0755 (repeatable)")
	flag.Parse()
	if err := run(*out, *tag, *entry, *user, files); err != nil {
		log.Error("failed", "error", err)
		os.Exit(1)
	}
	log.Info("wrote", "image", *tag, "file", *out)
}

func run(out, tag, entry, user string, files adds) error {
	if out == "" || tag == "" || len(files) == 0 {
		return errors.New("oci-image: -o, -tag and at least one -add are required")
	}
	ref, err := name.NewTag(tag)
	if err != nil {
		return fmt.Errorf("oci-image: tag %q: %w", tag, err)
	}
	layerTar, err := layer(files)
	if err != nil {
		return err
	}
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	})
	if err != nil {
		return fmt.Errorf("oci-image: layer: %w", err)
	}
	img, err := mutate.AppendLayers(empty.Image, l)
	if err != nil {
		return fmt.Errorf("oci-image: append layer: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return fmt.Errorf("oci-image: config: %w", err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	cf.Created = v1.Time{Time: time.Unix(0, 0).UTC()} // reproducible: same inputs, same digest
	cf.Config.Env = []string{"PATH=/usr/local/bin:/usr/bin:/bin"}
	cf.Config.User = user
	cf.Config.WorkingDir = "/"
	if entry != "" {
		cf.Config.Entrypoint = strings.Fields(entry)
	}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return fmt.Errorf("oci-image: set config: %w", err)
	}
	tmp := out + ".tmp"
	if err := tarball.WriteToFile(tmp, ref, img); err != nil {
		return fmt.Errorf("oci-image: write %s: %w", out, err)
	}
	if err := os.Rename(tmp, out); err != nil {
		return fmt.Errorf("oci-image: %w", err)
	}
	return nil
}

// layer is the image's one layer: the files with their parent directories,
// and /etc/passwd, /etc/group and an empty /tmp.
func layer(files adds) ([]byte, error) {
	entries := map[string][]byte{
		"/etc/passwd": []byte("root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"),
		"/etc/group":  []byte("root:x:0:\nnonroot:x:65532:\n"),
	}
	modes := map[string]int64{"/etc/passwd": 0o644, "/etc/group": 0o644}
	for dst, src := range files {
		b, err := os.ReadFile(src)
		if err != nil {
			return nil, fmt.Errorf("oci-image: %s: %w", dst, err)
		}
		entries[dst], modes[dst] = b, 0o755
	}
	dirs := map[string]bool{"/tmp": true}
	for p := range entries {
		for d := path.Dir(p); d != "/"; d = path.Dir(d) {
			dirs[d] = true
		}
	}
	var names []string
	for d := range dirs {
		names = append(names, d)
	}
	sort.Strings(names) // parents before children
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	epoch := time.Unix(0, 0)
	for _, d := range names {
		mode := int64(0o755)
		if d == "/tmp" {
			mode = 0o1777
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d[1:] + "/", Mode: mode, ModTime: epoch}); err != nil {
			return nil, fmt.Errorf("oci-image: layer: %w", err)
		}
	}
	var fnames []string
	for p := range entries {
		fnames = append(fnames, p)
	}
	sort.Strings(fnames)
	for _, p := range fnames {
		b := entries[p]
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: p[1:], Mode: modes[p], Size: int64(len(b)), ModTime: epoch}); err != nil {
			return nil, fmt.Errorf("oci-image: layer: %w", err)
		}
		if _, err := tw.Write(b); err != nil {
			return nil, fmt.Errorf("oci-image: layer: %w", err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("oci-image: layer: %w", err)
	}
	return buf.Bytes(), nil
}
