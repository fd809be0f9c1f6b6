package allreduce

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// hostIdentity names this machine for the same-host check: the hostname and
// the kernel's boot id (which differs between machines, VMs and reboots,
// even where hostnames repeat). "" when the boot id cannot be read, which
// turns the same-host path off.
var hostIdentity = sync.OnceValue(func() string {
	id, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	host, _ := os.Hostname()
	return host + "/" + strings.TrimSpace(string(id))
})

// createShmRegion creates, sizes and maps a new shared-memory file for the
// hop from rank src to its successor. The space is allocated up front
// (fallocate), so a full tmpfs fails here instead of with SIGBUS later, and
// both ends map it populated, so the first collective does not pay a page
// fault per 4 KiB of slots.
func createShmRegion(g shmGeometry, epoch uint64, src, world int) (*shmRegion, error) {
	if g.size() > shmMaxBytes {
		return nil, fmt.Errorf("%d queues × %d slots × %d bytes exceed %d MiB", g.queues, g.slots, g.slotBytes, shmMaxBytes>>20)
	}
	var rnd [16]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return nil, err
	}
	path := filepath.Join(shmDir(), fmt.Sprintf("%s%d-r%d-%s", shmNamePrefix, os.Getpid(), src, hex.EncodeToString(rnd[:8])))
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fail := func(err error) (*shmRegion, error) {
		_ = os.Remove(path)
		return nil, err
	}
	if err := unix.Fallocate(int(f.Fd()), 0, 0, int64(g.size())); err != nil {
		if !errors.Is(err, unix.EOPNOTSUPP) {
			return fail(fmt.Errorf("allocate %d bytes in %s: %w", g.size(), path, err))
		}
		if err := f.Truncate(int64(g.size())); err != nil {
			return fail(err)
		}
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, g.size(), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fail(fmt.Errorf("map %s: %w", path, err))
	}
	s := &shmRegion{mem: mem, geo: g, path: path, nonce: binary.LittleEndian.Uint64(rnd[8:])}
	s.writeHeader(epoch, src, world)
	s.layout()
	return s, nil
}

// openShmRegion maps the file a predecessor offered, checks it is the one
// it created for this hop, and unlinks it: both ends have it mapped now.
func openShmRegion(path string, nonce, epoch uint64, src, world int) (*shmRegion, error) {
	dir, base := filepath.Dir(path), filepath.Base(path)
	if !strings.HasPrefix(base, shmNamePrefix) || (dir != "/dev/shm" && dir != filepath.Clean(os.TempDir())) {
		return nil, fmt.Errorf("path %q is not a bmojo shared-memory file", path)
	}
	path = filepath.Join(dir, base) // the checked, lexically clean form
	f, err := os.OpenFile(path, os.O_RDWR|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() || st.Size() < shmHdrBytes || st.Size() > shmMaxBytes {
		return nil, fmt.Errorf("%s: not a regular file of a plausible size (%d bytes)", path, st.Size())
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return nil, fmt.Errorf("map %s: %w", path, err)
	}
	g, err := checkShmHeader(mem, nonce, epoch, src, world)
	if err != nil {
		_ = unix.Munmap(mem)
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	_ = os.Remove(path)
	s := &shmRegion{mem: mem, geo: g, nonce: nonce}
	s.layout()
	return s, nil
}

// unlink removes the file's name (the mapping stays); idempotent.
func (s *shmRegion) unlink() {
	if s.path != "" {
		_ = os.Remove(s.path)
		s.path = ""
	}
}

// unmap releases the mapping; nothing may touch the region afterwards.
func (s *shmRegion) unmap() {
	s.unlink()
	if s.mem != nil {
		_ = unix.Munmap(s.mem)
		s.mem, s.queues = nil, nil
	}
}

func nanosleep(d time.Duration) {
	ts := unix.NsecToTimespec(int64(d))
	_ = unix.Nanosleep(&ts, nil)
}
