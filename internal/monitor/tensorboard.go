package monitor

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math"
	"os"
	"path/filepath"
	"sync"
	"time"

	"google.golang.org/protobuf/encoding/protowire"
)

// TensorBoard event files are TFRecord files of tensorflow.Event protos.
// A record is: uint64 length (little endian), uint32 masked CRC-32C of the
// length bytes, the data, uint32 masked CRC-32C of the data. The protos are
// encoded by hand (field numbers from tensorflow/core/util/event.proto and
// framework/summary.proto) so no TensorFlow code is needed:
//
//	Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
//	Summary { repeated Value value = 1; }
//	Value   { string tag = 1; float simple_value = 2; }

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// MaskedCRC is TFRecord's checksum: CRC-32C rotated right by 15 bits plus a
// constant, so a CRC of data that holds CRCs stays well distributed.
func MaskedCRC(b []byte) uint32 {
	c := crc32.Checksum(b, castagnoli)
	return ((c >> 15) | (c << 17)) + 0xa282ead8
}

// TBWriter writes one TensorBoard event file.
type TBWriter struct {
	mu   sync.Mutex
	f    *os.File
	w    *bufio.Writer
	path string
}

// NewTBWriter creates dir and an event file in it named as TensorBoard
// expects (events.out.tfevents.<unix seconds>.<host>), beginning with the
// file_version record.
func NewTBWriter(dir string) (*TBWriter, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("tensorboard: %w", err)
	}
	host, _ := os.Hostname()
	now := time.Now()
	path := filepath.Join(dir, fmt.Sprintf("events.out.tfevents.%d.%s.%d", now.Unix(), host, os.Getpid()))
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return nil, fmt.Errorf("tensorboard: %w", err)
	}
	t := &TBWriter{f: f, w: bufio.NewWriter(f), path: path}
	var ev []byte
	ev = protowire.AppendTag(ev, 1, protowire.Fixed64Type)
	ev = protowire.AppendFixed64(ev, math.Float64bits(unixSeconds(now)))
	ev = protowire.AppendTag(ev, 3, protowire.BytesType)
	ev = protowire.AppendString(ev, "brain.Event:2")
	if err := t.record(ev); err != nil {
		f.Close()
		return nil, err
	}
	return t, t.Flush()
}

// Path is the event file's path.
func (t *TBWriter) Path() string { return t.path }

// Scalar appends one scalar summary (tag, step, value) stamped now.
func (t *TBWriter) Scalar(tag string, step int, v float64) error {
	var val []byte
	val = protowire.AppendTag(val, 1, protowire.BytesType)
	val = protowire.AppendString(val, tag)
	val = protowire.AppendTag(val, 2, protowire.Fixed32Type)
	val = protowire.AppendFixed32(val, math.Float32bits(float32(v)))
	var sum []byte
	sum = protowire.AppendTag(sum, 1, protowire.BytesType)
	sum = protowire.AppendBytes(sum, val)
	var ev []byte
	ev = protowire.AppendTag(ev, 1, protowire.Fixed64Type)
	ev = protowire.AppendFixed64(ev, math.Float64bits(unixSeconds(time.Now())))
	ev = protowire.AppendTag(ev, 2, protowire.VarintType)
	ev = protowire.AppendVarint(ev, uint64(step))
	ev = protowire.AppendTag(ev, 5, protowire.BytesType)
	ev = protowire.AppendBytes(ev, sum)
	return t.record(ev)
}

func (t *TBWriter) record(data []byte) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	var hdr [12]byte
	binary.LittleEndian.PutUint64(hdr[:8], uint64(len(data)))
	binary.LittleEndian.PutUint32(hdr[8:], MaskedCRC(hdr[:8]))
	var tail [4]byte
	binary.LittleEndian.PutUint32(tail[:], MaskedCRC(data))
	for _, b := range [][]byte{hdr[:], data, tail[:]} {
		if _, err := t.w.Write(b); err != nil {
			return fmt.Errorf("tensorboard: write %s: %w", t.path, err)
		}
	}
	return nil
}

// Flush writes buffered records to the file.
func (t *TBWriter) Flush() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if err := t.w.Flush(); err != nil {
		return fmt.Errorf("tensorboard: flush %s: %w", t.path, err)
	}
	return nil
}

// Close flushes and closes the file.
func (t *TBWriter) Close() error {
	err := t.Flush()
	if cerr := t.f.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("tensorboard: close: %w", cerr)
	}
	return err
}

// TBScalar is one scalar read back from an event file.
type TBScalar struct {
	Tag   string
	Step  int
	Value float32
	Wall  float64
}

// ErrTBCorrupt means an event file's record has a bad length or checksum.
var ErrTBCorrupt = errors.New("tensorboard: corrupt record")

// ReadTBScalars reads an event file back, checking every checksum; it
// returns the file_version and the scalars in file order. Tests and
// `bmojo` tooling use it; TensorBoard itself reads the same bytes.
func ReadTBScalars(r io.Reader) (version string, out []TBScalar, err error) {
	br := bufio.NewReader(r)
	for {
		var hdr [12]byte
		if _, err := io.ReadFull(br, hdr[:]); err == io.EOF {
			return version, out, nil
		} else if err != nil {
			return version, out, fmt.Errorf("%w: header: %w", ErrTBCorrupt, err)
		}
		if MaskedCRC(hdr[:8]) != binary.LittleEndian.Uint32(hdr[8:]) {
			return version, out, fmt.Errorf("%w: length checksum", ErrTBCorrupt)
		}
		n := binary.LittleEndian.Uint64(hdr[:8])
		if n > 1<<20 {
			return version, out, fmt.Errorf("%w: length %d", ErrTBCorrupt, n)
		}
		data := make([]byte, n+4)
		if _, err := io.ReadFull(br, data); err != nil {
			return version, out, fmt.Errorf("%w: data: %w", ErrTBCorrupt, err)
		}
		if MaskedCRC(data[:n]) != binary.LittleEndian.Uint32(data[n:]) {
			return version, out, fmt.Errorf("%w: data checksum", ErrTBCorrupt)
		}
		v, sc, err := parseEvent(data[:n])
		if err != nil {
			return version, out, err
		}
		if v != "" {
			version = v
		}
		out = append(out, sc...)
	}
}

func parseEvent(b []byte) (version string, out []TBScalar, err error) {
	var wall float64
	var step int
	var sums [][]byte
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return "", nil, fmt.Errorf("%w: event tag", ErrTBCorrupt)
		}
		b = b[n:]
		switch {
		case num == 1 && typ == protowire.Fixed64Type:
			v, n := protowire.ConsumeFixed64(b)
			wall, b = math.Float64frombits(v), b[max(n, 0):]
		case num == 2 && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			step, b = int(v), b[max(n, 0):]
		case num == 3 && typ == protowire.BytesType:
			v, n := protowire.ConsumeString(b)
			version, b = v, b[max(n, 0):]
		case num == 5 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			sums, b = append(sums, v), b[max(n, 0):]
		default:
			n := protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return "", nil, fmt.Errorf("%w: event field %d", ErrTBCorrupt, num)
			}
			b = b[n:]
		}
	}
	for _, s := range sums {
		for len(s) > 0 {
			num, typ, n := protowire.ConsumeTag(s)
			if n < 0 || num != 1 || typ != protowire.BytesType {
				return "", nil, fmt.Errorf("%w: summary", ErrTBCorrupt)
			}
			val, m := protowire.ConsumeBytes(s[n:])
			if m < 0 {
				return "", nil, fmt.Errorf("%w: summary value", ErrTBCorrupt)
			}
			s = s[n+m:]
			sc := TBScalar{Step: step, Wall: wall}
			for len(val) > 0 {
				num, typ, n := protowire.ConsumeTag(val)
				if n < 0 {
					return "", nil, fmt.Errorf("%w: value tag", ErrTBCorrupt)
				}
				val = val[n:]
				switch {
				case num == 1 && typ == protowire.BytesType:
					v, n := protowire.ConsumeString(val)
					sc.Tag, val = v, val[max(n, 0):]
				case num == 2 && typ == protowire.Fixed32Type:
					v, n := protowire.ConsumeFixed32(val)
					sc.Value, val = math.Float32frombits(v), val[max(n, 0):]
				default:
					n := protowire.ConsumeFieldValue(num, typ, val)
					if n < 0 {
						return "", nil, fmt.Errorf("%w: value field %d", ErrTBCorrupt, num)
					}
					val = val[n:]
				}
			}
			out = append(out, sc)
		}
	}
	return version, out, nil
}

func unixSeconds(t time.Time) float64 { return float64(t.UnixNano()) / 1e9 }

// tbExport writes each tag's points once, in step order: a reload of the
// cache, or a step replayed after a failure, writes nothing twice.
type tbExport struct {
	w        *TBWriter
	last     map[string]int
	lastSync time.Time
	log      func(error)
}

func newTBExport(dir string) (*tbExport, error) {
	w, err := NewTBWriter(dir)
	if err != nil {
		return nil, err
	}
	return &tbExport{w: w, last: map[string]int{}}, nil
}

// scalar is a no-op on a nil export (no --tensorboard).
func (e *tbExport) scalar(tag string, step int, v float64) {
	if e == nil {
		return
	}
	if last, ok := e.last[tag]; ok && step <= last {
		return
	}
	e.last[tag] = step
	err := e.w.Scalar(tag, step, v)
	if err == nil && time.Since(e.lastSync) > time.Second {
		e.lastSync = time.Now()
		err = e.w.Flush()
	}
	if err != nil && e.log != nil {
		e.log(err)
	}
}

func (e *tbExport) close() {
	if err := e.w.Close(); err != nil && e.log != nil {
		e.log(err)
	}
}
