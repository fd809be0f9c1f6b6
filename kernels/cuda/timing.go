//go:build cuda

package cuda

import (
	"fmt"
	"sort"
)

type timedOp struct {
	op       string
	from, to any
}

// StartTiming makes every op queued from now on record stream events
// around its work, until StopTiming. With perKernel, each kernel launch of
// an op is a row of its own ("op/kernel").
func (d *Device) StartTiming(perKernel bool) {
	d.do(func() { d.timing, d.timingKernels, d.timedOps = true, perKernel, nil })
}

// StopTiming waits for the stream and returns the GPU time of each op
// since StartTiming, largest first.
func (d *Device) StopTiming() ([]OpTime, error) {
	var out []OpTime
	var err error
	d.do(func() {
		d.timing = false
		if err = d.drv.sync(); err != nil {
			return
		}
		by := map[string]*OpTime{}
		for _, t := range d.timedOps {
			ms, e := d.drv.since(t.from, t.to)
			if e != nil {
				err = fmt.Errorf("cuda: timing %s: %w", t.op, e)
				return
			}
			o := by[t.op]
			if o == nil {
				o = &OpTime{Op: t.op}
				by[t.op] = o
			}
			o.Ms += ms
			o.Launches++
		}
		d.timedOps = nil
		for _, o := range by {
			out = append(out, *o)
		}
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Ms > out[j].Ms })
	return out, err
}

// timedRun runs f between two stream marks when timing is on, recorded
// under op (or op/kernel when timing per kernel and kernel is set). Device
// thread.
func (d *Device) timedRun(op, kernel string, f func() error) error {
	if !d.timing {
		return f()
	}
	if d.timingKernels && kernel != "" {
		op += "/" + kernel
	}
	from, err := d.drv.mark()
	if err != nil {
		return err
	}
	ferr := f()
	to, err := d.drv.mark()
	if err != nil {
		return err
	}
	d.timedOps = append(d.timedOps, timedOp{op, from, to})
	return ferr
}
