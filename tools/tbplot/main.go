// Command tbplot draws a run's loss curves from the TensorBoard event files
// bmojo train --tensorboard DIR writes: the training loss per step (and its
// moving average) and the validation loss at each evaluation.
//
//	go run ./tools/tbplot -title "..." -out docs/results/run.png DIR
package main

import (
	"flag"
	"fmt"
	"image/color"
	"os"
	"path/filepath"
	"sort"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"

	"github.com/bmojo/bmojo/internal/monitor"
)

func main() {
	out := flag.String("out", "loss.png", "PNG to write")
	title := flag.String("title", "loss", "plot title")
	unit := flag.String("unit", "nats/token", "the loss's unit (y axis)")
	window := flag.Int("smooth", 25, "moving-average window of the training loss, in steps")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: tbplot [-out F.png] [-title T] DIR")
		os.Exit(2)
	}
	if err := run(flag.Arg(0), *out, *title, *unit, *window); err != nil {
		fmt.Fprintln(os.Stderr, "tbplot:", err)
		os.Exit(1)
	}
}

func run(dir, out, title, unit string, window int) error {
	files, err := filepath.Glob(filepath.Join(dir, "events.out.tfevents.*"))
	if err != nil || len(files) == 0 {
		return fmt.Errorf("no events.out.tfevents.* in %s", dir)
	}
	series := map[string]map[int]float64{}
	for _, f := range files {
		r, err := os.Open(f)
		if err != nil {
			return err
		}
		_, scalars, err := monitor.ReadTBScalars(r)
		r.Close()
		if err != nil {
			return fmt.Errorf("%s: %w", f, err)
		}
		for _, s := range scalars {
			if series[s.Tag] == nil {
				series[s.Tag] = map[int]float64{}
			}
			series[s.Tag][s.Step] = float64(s.Value)
		}
	}
	xy := func(tag string) plotter.XYs {
		var steps []int
		for s := range series[tag] {
			steps = append(steps, s)
		}
		sort.Ints(steps)
		pts := make(plotter.XYs, len(steps))
		for i, s := range steps {
			pts[i] = plotter.XY{X: float64(s), Y: series[tag][s]}
		}
		return pts
	}
	train, val := xy("loss"), evals(xy("val_loss"))
	if len(train) == 0 {
		return fmt.Errorf("%s has no loss scalars", dir)
	}
	p := plot.New()
	p.Title.Text = title
	p.X.Label.Text = "step"
	p.Y.Label.Text = "loss (" + unit + ")"
	p.Add(plotter.NewGrid())
	raw, err := plotter.NewLine(train)
	if err != nil {
		return err
	}
	raw.Color = color.RGBA{R: 150, G: 180, B: 230, A: 255}
	p.Add(raw)
	p.Legend.Add("train (per step)", raw)
	if window > 1 && len(train) > window {
		avg := make(plotter.XYs, 0, len(train))
		sum := 0.0
		for i, pt := range train {
			sum += pt.Y
			if i >= window {
				sum -= train[i-window].Y
			}
			if i >= window-1 {
				avg = append(avg, plotter.XY{X: pt.X, Y: sum / float64(window)})
			}
		}
		l, err := plotter.NewLine(avg)
		if err != nil {
			return err
		}
		l.Color, l.Width = color.RGBA{B: 180, A: 255}, vg.Points(1.5)
		p.Add(l)
		p.Legend.Add(fmt.Sprintf("train (mean of %d)", window), l)
	}
	if len(val) > 0 {
		l, pts, err := plotter.NewLinePoints(val)
		if err != nil {
			return err
		}
		l.Color, pts.Color, l.Width = color.RGBA{R: 200, A: 255}, color.RGBA{R: 200, A: 255}, vg.Points(1.5)
		p.Add(l, pts)
		p.Legend.Add("validation", l, pts)
	}
	p.Legend.Top = true
	return p.Save(8*vg.Inch, 4.5*vg.Inch, out)
}

// evals keeps the first point of each validation value: the export repeats
// the latest evaluation at every step until the next one.
func evals(pts plotter.XYs) plotter.XYs {
	var out plotter.XYs
	for i, p := range pts {
		if i == 0 || p.Y != pts[i-1].Y {
			out = append(out, p)
		}
	}
	return out
}
