package experiment

import (
	"encoding/csv"
	"fmt"
	"image/color"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"

	"github.com/bmojo/bmojo/experiment/mqar"
)

// writeCSV writes rows (the first is the header) to path atomically
// enough for a report: a temporary file renamed over it.
func writeCSV(path string, rows [][]string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("experiment: report: %w", err)
	}
	tmp := path + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return fmt.Errorf("experiment: report: %w", err)
	}
	w := csv.NewWriter(f)
	if err := w.WriteAll(rows); err != nil {
		f.Close()
		return fmt.Errorf("experiment: report: %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("experiment: report: %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("experiment: report: %w", err)
	}
	return nil
}

func ff(x float64) string {
	if math.IsNaN(x) || math.IsInf(x, 0) {
		return ""
	}
	return strconv.FormatFloat(x, 'g', 6, 64)
}

// palette is one colour per family, in Families order.
var palette = []color.Color{
	color.RGBA{0xd6, 0x27, 0x28, 0xff}, // bmojo
	color.RGBA{0xff, 0x7f, 0x0e, 0xff}, // bmojo-f
	color.RGBA{0x1f, 0x77, 0xb4, 0xff}, // mamba
	color.RGBA{0x2c, 0xa0, 0x2c, 0xff}, // swa
	color.RGBA{0x7f, 0x7f, 0x7f, 0xff}, // transformer
	color.RGBA{0x94, 0x67, 0xbd, 0xff}, // hybrid
	color.RGBA{0x8c, 0x56, 0x4b, 0xff},
	color.RGBA{0xe3, 0x77, 0xc2, 0xff},
}

func colour(i int) color.Color { return palette[i%len(palette)] }

// addLine adds a line with points to p.
func addLine(p *plot.Plot, name string, xy plotter.XYs, c color.Color, dashed bool) error {
	l, s, err := plotter.NewLinePoints(xy)
	if err != nil {
		return fmt.Errorf("experiment: plot %s: %w", name, err)
	}
	l.Color, s.Color = c, c
	l.Width = vg.Points(1.5)
	if dashed {
		l.Dashes = []vg.Length{vg.Points(4), vg.Points(2)}
	}
	p.Add(l, s)
	p.Legend.Add(name, l, s)
	return nil
}

// preciseTicks are gonum's default ticks labelled with four significant
// digits: losses that differ in the third decimal stay distinguishable.
type preciseTicks struct{}

// Ticks implements plot.Ticker.
func (preciseTicks) Ticks(lo, hi float64) []plot.Tick {
	ts := plot.DefaultTicks{}.Ticks(lo, hi)
	for i := range ts {
		if ts[i].Label != "" {
			ts[i].Label = strconv.FormatFloat(ts[i].Value, 'g', 4, 64)
		}
	}
	return ts
}

// categoricalX labels x = 0..n-1 with names.
func categoricalX(p *plot.Plot, names []string) {
	var ticks []plot.Tick
	for i, n := range names {
		ticks = append(ticks, plot.Tick{Value: float64(i), Label: n})
	}
	p.X.Tick.Marker = plot.ConstantTicks(ticks)
	p.X.Min, p.X.Max = -0.3, float64(len(names))-0.7
}

// savePanels draws plots in a grid of cols columns into a PNG.
func savePanels(path string, ps []*plot.Plot, cols int, w, h vg.Length) error {
	rows := (len(ps) + cols - 1) / cols
	grid := make([][]*plot.Plot, rows)
	for i := range grid {
		grid[i] = make([]*plot.Plot, cols)
		for j := range cols {
			if k := i*cols + j; k < len(ps) {
				grid[i][j] = ps[k]
			}
		}
	}
	img := vgimg.New(w*vg.Length(cols), h*vg.Length(rows))
	dc := draw.New(img)
	t := draw.Tiles{Rows: rows, Cols: cols, PadX: vg.Millimeter * 2, PadY: vg.Millimeter * 2,
		PadTop: vg.Millimeter * 2, PadBottom: vg.Millimeter * 2, PadLeft: vg.Millimeter * 2, PadRight: vg.Millimeter * 2}
	canvases := plot.Align(grid, t, dc)
	for i := range grid {
		for j := range grid[i] {
			if grid[i][j] != nil {
				grid[i][j].Draw(canvases[i][j])
			}
		}
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("experiment: report: %w", err)
	}
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("experiment: report: %w", err)
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return fmt.Errorf("experiment: report: %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("experiment: report: %s: %w", path, err)
	}
	return nil
}

// WriteMQAR writes DIR/mqar.csv (every cell and setting; best marks the
// cell the lr sweep picked) and DIR/mqar.png (best accuracy against
// d_model, one line per family, one panel per test setting). title names
// where the figures came from (device, quick or full).
func WriteMQAR(dir, name, title string, rs []Result) error {
	best := map[string]bool{}
	for _, r := range BestByLR(rs) {
		best[r.Hash] = true
	}
	rows := [][]string{{"family", "d_model", "lr", "best_lr", "memory", "select_per_chunk", "seq_len", "kv", "accuracy", "loss", "examples", "train_steps", "device", "wall_seconds", "cell"}}
	for _, r := range rs {
		c := r.Cell
		cfg, _ := c.ModelConfig(mqar.Vocab)
		for _, s := range r.MQAR {
			rows = append(rows, []string{c.Model.Family, strconv.Itoa(c.Model.DModel), ff(c.LR), strconv.FormatBool(best[r.Hash]),
				strconv.Itoa(cfg.Memory), strconv.Itoa(cfg.SelectPerChunk), strconv.Itoa(s.Setting.T), strconv.Itoa(s.Setting.K),
				ff(s.Accuracy), ff(float64(s.Loss)), strconv.Itoa(s.Examples), strconv.Itoa(r.Steps), r.Device, ff(r.WallSeconds), r.Hash})
		}
	}
	if err := writeCSV(filepath.Join(dir, name+".csv"), rows); err != nil {
		return err
	}
	bs := BestByLR(rs)
	var settings []mqar.Setting
	var dms []int
	for _, r := range bs {
		for _, s := range r.MQAR {
			if !slices.Contains(settings, s.Setting) {
				settings = append(settings, s.Setting)
			}
		}
		if !slices.Contains(dms, r.Cell.Model.DModel) {
			dms = append(dms, r.Cell.Model.DModel)
		}
	}
	slices.Sort(dms)
	var names []string
	for _, d := range dms {
		names = append(names, strconv.Itoa(d))
	}
	var ps []*plot.Plot
	for _, s := range settings {
		p := plot.New()
		p.Title.Text = fmt.Sprintf("T=%d, K=%d", s.T, s.K)
		if len(ps) == 0 && title != "" {
			p.Title.Text = title + "\n" + p.Title.Text
		}
		p.X.Label.Text, p.Y.Label.Text = "d_model", "accuracy (best lr)"
		p.Y.Min, p.Y.Max = 0, 1.02
		categoricalX(p, names)
		p.Legend.Top, p.Legend.Left = true, true
		for fi, f := range Families {
			var xy plotter.XYs
			for _, r := range bs {
				if r.Cell.Model.Family != f {
					continue
				}
				if a, ok := r.Accuracy(s); ok {
					xy = append(xy, plotter.XY{X: float64(slices.Index(dms, r.Cell.Model.DModel)), Y: a.Accuracy})
				}
			}
			if len(xy) > 0 {
				if err := addLine(p, f, xy, colour(fi), false); err != nil {
					return err
				}
			}
		}
		ps = append(ps, p)
	}
	if len(ps) == 0 {
		return nil
	}
	cols := min(4, len(ps))
	return savePanels(filepath.Join(dir, name+".png"), ps, cols, 8*vg.Centimeter, 7*vg.Centimeter)
}

// lmLabel names an LM cell's line.
func lmLabel(c Cell) string {
	s := c.Model.Family
	if c.StatePassing {
		s += " +state passing"
	}
	if c.Model.Memory >= 0 || c.Model.SelectPerChunk >= 0 {
		s += fmt.Sprintf(" M=%d k=%d", c.Model.Memory, c.Model.SelectPerChunk)
	}
	return s
}

// WriteLength writes DIR/length.csv (mean loss per length, and the loss
// per position bucket) and DIR/length.png (mean loss against evaluation
// length; position-wise loss at the longest length evaluated).
func WriteLength(dir, title string, rs []Result) error {
	rows := [][]string{{"family", "state_passing", "size", "train_t", "eval_t", "kind", "pos_start", "pos_end", "loss", "windows", "device", "wall_seconds", "cell"}}
	for _, r := range rs {
		c := r.Cell
		for _, l := range r.LM {
			base := []string{c.Model.Family, strconv.FormatBool(c.StatePassing), c.Size, strconv.Itoa(c.TrainT), strconv.Itoa(l.T)}
			tail := []string{strconv.Itoa(l.Windows), r.Device, ff(r.WallSeconds), r.Hash}
			rows = append(rows, slices.Concat(base, []string{"mean", "0", strconv.Itoa(l.T), ff(float64(l.MeanLoss))}, tail))
			for _, b := range l.Buckets {
				rows = append(rows, slices.Concat(base, []string{"position", strconv.Itoa(b.Start), strconv.Itoa(b.End), ff(float64(b.Loss))}, tail))
			}
		}
	}
	if err := writeCSV(filepath.Join(dir, "length.csv"), rows); err != nil {
		return err
	}
	if len(rs) == 0 {
		return nil
	}
	mean, pos := plot.New(), plot.New()
	mean.Title.Text = "mean loss per evaluation length"
	if title != "" {
		mean.Title.Text = title + "\n" + mean.Title.Text
	}
	mean.X.Label.Text, mean.Y.Label.Text = "evaluation length (tokens)", "loss (nats/token)"
	mean.Y.Tick.Marker, pos.Y.Tick.Marker = preciseTicks{}, preciseTicks{}
	mean.X.Scale = plot.LogScale{}
	var lens []plot.Tick
	for _, r := range rs {
		for _, l := range r.LM {
			if !slices.ContainsFunc(lens, func(t plot.Tick) bool { return t.Value == float64(l.T) }) {
				lens = append(lens, plot.Tick{Value: float64(l.T), Label: strconv.Itoa(l.T)})
			}
		}
	}
	mean.X.Tick.Marker = plot.ConstantTicks(lens)
	pos.X.Label.Text, pos.Y.Label.Text = "position in window", "loss (nats/token)"
	mean.Legend.Top, pos.Legend.Top = true, true
	longest := 0
	for _, r := range rs {
		for _, l := range r.LM {
			if len(l.Buckets) > 0 {
				longest = max(longest, l.T)
			}
		}
	}
	pos.Title.Text = fmt.Sprintf("position-wise loss at T=%d", longest)
	for i, r := range rs {
		var xy, pxy plotter.XYs
		for _, l := range r.LM {
			if !math.IsNaN(float64(l.MeanLoss)) && l.Windows > 0 {
				xy = append(xy, plotter.XY{X: float64(l.T), Y: float64(l.MeanLoss)})
			}
			if l.T == longest {
				for _, b := range l.Buckets {
					if !math.IsNaN(float64(b.Loss)) {
						pxy = append(pxy, plotter.XY{X: float64(b.Start+b.End) / 2, Y: float64(b.Loss)})
					}
				}
			}
		}
		name := lmLabel(r.Cell)
		col := colour(familyIndex(r.Cell.Model.Family))
		if i > 0 && r.Cell.StatePassing {
			col = colour(len(Families) + 1)
		}
		if len(xy) > 0 {
			if err := addLine(mean, name, xy, col, r.Cell.StatePassing); err != nil {
				return err
			}
		}
		if len(pxy) > 0 {
			if err := addLine(pos, name, pxy, col, r.Cell.StatePassing); err != nil {
				return err
			}
		}
	}
	pos.X.Label.Text = fmt.Sprintf("position in window (trained at T=%d)", rs[0].Cell.TrainT)
	return savePanels(filepath.Join(dir, "length.png"), []*plot.Plot{mean, pos}, 2, 12*vg.Centimeter, 9*vg.Centimeter)
}

// WriteMemory writes DIR/memory.csv and DIR/memory.png: MQAR accuracy
// (best lr) against M, one line per (test setting, k_sel), and LM loss
// against M, one line per (evaluation length, k_sel).
func WriteMemory(dir, title string, mq, lm []Result) error {
	rows := [][]string{{"task", "memory", "select_per_chunk", "setting", "metric", "value", "lr", "device", "wall_seconds", "cell"}}
	best := BestByLR(mq)
	var ms []int
	for _, r := range slices.Concat(best, lm) {
		if !slices.Contains(ms, r.Cell.Model.Memory) {
			ms = append(ms, r.Cell.Model.Memory)
		}
	}
	slices.Sort(ms)
	for _, r := range best {
		for _, s := range r.MQAR {
			rows = append(rows, []string{"mqar", strconv.Itoa(r.Cell.Model.Memory), strconv.Itoa(r.Cell.Model.SelectPerChunk),
				fmt.Sprintf("T=%d K=%d", s.Setting.T, s.Setting.K), "accuracy", ff(s.Accuracy), ff(r.Cell.LR), r.Device, ff(r.WallSeconds), r.Hash})
		}
	}
	for _, r := range lm {
		for _, l := range r.LM {
			rows = append(rows, []string{"lm", strconv.Itoa(r.Cell.Model.Memory), strconv.Itoa(r.Cell.Model.SelectPerChunk),
				fmt.Sprintf("T=%d", l.T), "mean_loss", ff(float64(l.MeanLoss)), ff(r.Cell.LR), r.Device, ff(r.WallSeconds), r.Hash})
		}
	}
	if err := writeCSV(filepath.Join(dir, "memory.csv"), rows); err != nil {
		return err
	}
	var names []string
	for _, m := range ms {
		names = append(names, strconv.Itoa(m))
	}
	acc, loss := plot.New(), plot.New()
	acc.Title.Text = "MQAR accuracy against eidetic memory M"
	if title != "" {
		acc.Title.Text = title + "\n" + acc.Title.Text
	}
	acc.X.Label.Text, acc.Y.Label.Text = "M (eidetic tokens)", "accuracy (best lr)"
	acc.Y.Min, acc.Y.Max = 0, 1.02
	loss.Title.Text = "LM loss against eidetic memory M"
	loss.X.Label.Text, loss.Y.Label.Text = "M (eidetic tokens)", "loss (nats/token)"
	loss.Y.Tick.Marker = preciseTicks{}
	categoricalX(acc, names)
	categoricalX(loss, names)
	acc.Legend.Top, loss.Legend.Top = true, true
	type key struct{ a, b int }
	lines := map[key]plotter.XYs{}
	var order []key
	for _, r := range best {
		for _, s := range r.MQAR {
			k := key{s.Setting.T<<16 | s.Setting.K, r.Cell.Model.SelectPerChunk}
			if _, ok := lines[k]; !ok {
				order = append(order, k)
			}
			lines[k] = append(lines[k], plotter.XY{X: float64(slices.Index(ms, r.Cell.Model.Memory)), Y: s.Accuracy})
		}
	}
	for i, k := range order {
		xy := lines[k]
		slices.SortFunc(xy, func(a, b plotter.XY) int { return int(a.X - b.X) })
		if err := addLine(acc, fmt.Sprintf("T=%d K=%d k_sel=%d", k.a>>16, k.a&0xffff, k.b), xy, colour(i), k.b != order[0].b); err != nil {
			return err
		}
	}
	lines, order = map[key]plotter.XYs{}, nil
	for _, r := range lm {
		for _, l := range r.LM {
			if math.IsNaN(float64(l.MeanLoss)) || l.Windows == 0 {
				continue
			}
			k := key{l.T, r.Cell.Model.SelectPerChunk}
			if _, ok := lines[k]; !ok {
				order = append(order, k)
			}
			lines[k] = append(lines[k], plotter.XY{X: float64(slices.Index(ms, r.Cell.Model.Memory)), Y: float64(l.MeanLoss)})
		}
	}
	for i, k := range order {
		xy := lines[k]
		slices.SortFunc(xy, func(a, b plotter.XY) int { return int(a.X - b.X) })
		if err := addLine(loss, fmt.Sprintf("T=%d k_sel=%d", k.a, k.b), xy, colour(i), false); err != nil {
			return err
		}
	}
	return savePanels(filepath.Join(dir, "memory.png"), []*plot.Plot{acc, loss}, 2, 12*vg.Centimeter, 9*vg.Centimeter)
}
