package monitor

import (
	"sort"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
)

// Metric names are stable: dashboards and alerts are built on them. Units
// are in the names (seconds, per_second, ratio). Every metric carries the
// constant label bmojo_job (the job name); per-worker metrics add
// worker_id and rank (-1 when not in the ring).
//
// GPU workers add their NVML telemetry: bmojo_worker_gpu_utilization_ratio,
// bmojo_worker_gpu_memory_used_bytes, bmojo_worker_gpu_memory_total_bytes,
// bmojo_worker_gpu_power_watts and bmojo_worker_gpu_temperature_celsius
// (extra label gpu: the device UUID).
var (
	workerLabels = []string{"worker_id", "rank"}

	descStep        = desc("bmojo_step", "Committed optimizer steps.")
	descSteps       = desc("bmojo_steps_total_planned", "Optimizer steps the job is configured for.")
	descProgress    = desc("bmojo_progress_ratio", "bmojo_step / bmojo_steps_total_planned.")
	descETA         = desc("bmojo_eta_seconds", "Estimated seconds to the last step (absent while unknown).")
	descLoss        = desc("bmojo_loss", "Training loss of the newest committed step (nats per token).")
	descValLoss     = desc("bmojo_val_loss", "Newest validation loss (nats per token); absent before the first evaluation.")
	descTPS         = desc("bmojo_tokens_per_second", "Training throughput of the whole ring since the epoch started.")
	descEpoch       = desc("bmojo_ring_epoch", "Current ring epoch (grows at each membership change).")
	descWorkers     = desc("bmojo_workers", "Workers in the current ring.")
	descWorkersUp   = desc("bmojo_workers_up", "Workers registered (alive) now, in the ring or joining.")
	descSkipped     = desc("bmojo_skipped_steps_total", "Steps skipped for a non-finite loss or gradient.")
	descDone        = desc("bmojo_job_done", "1 once the job has finished.")
	descCkptStep    = desc("bmojo_checkpoint_latest_step", "Step of the newest committed checkpoint.")
	descRecovery    = desc("bmojo_last_recovery_seconds", "Seconds from the newest membership change to its epoch's start.")
	descEvents      = prometheus.NewDesc("bmojo_membership_events_total", "Membership events seen, by kind (joined, left, reported, refused, not_ready, ring, started, leader_elected, ...).", []string{"kind"}, nil)
	descWStep       = wdesc("bmojo_worker_step_seconds", "Wall time of the worker's newest step, data to optimizer.")
	descWData       = wdesc("bmojo_worker_data_seconds", "Time of the newest step spent sampling the local batch.")
	descWCompute    = wdesc("bmojo_worker_compute_seconds", "Time of the newest step spent in forward and backward.")
	descWWait       = wdesc("bmojo_worker_allreduce_wait_seconds", "Time from the end of backward to the last all-reduce bucket's arrival.")
	descWOptim      = wdesc("bmojo_worker_optimizer_seconds", "Time of the newest step spent in the optimizer.")
	descWTPS        = wdesc("bmojo_worker_tokens_per_second", "The worker's own tokens per second in its newest step.")
	descWGrad       = wdesc("bmojo_worker_grad_norm", "Global gradient norm of the newest step, as the worker saw it.")
	descWUp         = wdesc("bmojo_worker_up", "1 while the worker is registered (its lease alive), 0 once gone.")
	descWStraggler  = wdesc("bmojo_worker_straggler", "1 for the worker the others wait for in the all-reduce.")
	descWLastStep   = wdesc("bmojo_worker_step", "The worker's newest completed step.")
	descWCheckpoint = wdesc("bmojo_checkpoint_seconds", "Duration of the worker's newest checkpoint write.")
	descWArrival    = wdesc("bmojo_worker_ring_arrival_seconds", "Seconds after the ring's first rank that this rank's gradients entered the all-reduce, in the newest step the workers share; the largest names the rank the others wait for.")
	descGPUUtil     = gdesc("bmojo_worker_gpu_utilization_ratio", "GPU busy fraction over NVML's last sample period.")
	descGPUMem      = gdesc("bmojo_worker_gpu_memory_used_bytes", "GPU memory in use (all processes).")
	descGPUMemTotal = gdesc("bmojo_worker_gpu_memory_total_bytes", "GPU memory in total.")
	descGPUPower    = gdesc("bmojo_worker_gpu_power_watts", "GPU power draw.")
	descGPUTemp     = gdesc("bmojo_worker_gpu_temperature_celsius", "GPU core temperature.")
)

func gdesc(name, help string) *prometheus.Desc {
	return prometheus.NewDesc(name, help, append(append([]string{}, workerLabels...), "gpu"), nil)
}

func desc(name, help string) *prometheus.Desc { return prometheus.NewDesc(name, help, nil, nil) }

func wdesc(name, help string) *prometheus.Desc {
	return prometheus.NewDesc(name, help, workerLabels, nil)
}

// collector turns the cached state into metrics at scrape time: no
// bookkeeping on the watch path, and a scrape sees one consistent state.
type collector struct{ m *Monitor }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descStep, descSteps, descProgress, descETA, descLoss, descValLoss, descTPS,
		descEpoch, descWorkers, descWorkersUp, descSkipped, descDone, descCkptStep, descRecovery, descEvents,
		descWStep, descWData, descWCompute, descWWait, descWOptim, descWTPS, descWGrad, descWUp, descWStraggler,
		descWLastStep, descWCheckpoint, descWArrival, descGPUUtil, descGPUMem, descGPUMemTotal, descGPUPower, descGPUTemp} {
		ch <- d
	}
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	s, err := c.m.Status()
	if err != nil {
		return // no job (yet): no job metrics
	}
	g := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	g(descStep, float64(s.Step))
	g(descSteps, float64(s.Steps))
	g(descProgress, s.Progress)
	if s.ETASeconds != nil {
		g(descETA, *s.ETASeconds)
	}
	g(descLoss, s.Loss)
	if s.ValLoss != 0 {
		g(descValLoss, s.ValLoss)
	}
	g(descTPS, s.TokensPerS)
	g(descEpoch, float64(s.Epoch))
	g(descWorkers, float64(s.RingSize))
	up := 0
	for _, w := range s.Workers {
		if w.Up {
			up++
		}
	}
	g(descWorkersUp, float64(up))
	ch <- prometheus.MustNewConstMetric(descSkipped, prometheus.CounterValue, float64(s.Skipped))
	g(descDone, b2f(s.Done))
	if s.Checkpoint != nil {
		g(descCkptStep, float64(s.Checkpoint.Step))
	}
	g(descRecovery, s.LastRecoverySeconds)

	c.m.mu.Lock()
	kinds := make([]string, 0, len(c.m.st.eventCounts))
	counts := map[string]float64{}
	for k, v := range c.m.st.eventCounts {
		kinds = append(kinds, k)
		counts[k] = v
	}
	c.m.mu.Unlock()
	sort.Strings(kinds)
	for _, k := range kinds {
		ch <- prometheus.MustNewConstMetric(descEvents, prometheus.CounterValue, counts[k], k)
	}

	for _, w := range s.Workers {
		l := []string{w.ID, strconv.Itoa(w.Rank)}
		g(descWUp, b2f(w.Up), l...)
		g(descWStraggler, b2f(w.Straggler), l...)
		if w.Updated == 0 {
			continue // no stats yet
		}
		g(descWStep, w.Step, l...)
		g(descWData, w.Data, l...)
		g(descWCompute, w.Compute, l...)
		g(descWWait, w.Wait, l...)
		g(descWOptim, w.Optimizer, l...)
		g(descWTPS, w.TokensPS, l...)
		g(descWGrad, w.GradNorm, l...)
		g(descWLastStep, float64(w.LastStep), l...)
		g(descWCheckpoint, w.Ckpt, l...)
		if w.RingArrival != nil {
			g(descWArrival, *w.RingArrival, l...)
		}
		if gs := w.GPU; gs != nil {
			gl := append(l, gs.UUID)
			g(descGPUUtil, gs.UtilPercent/100, gl...)
			g(descGPUMem, gs.MemUsedBytes, gl...)
			g(descGPUMemTotal, gs.MemTotal, gl...)
			g(descGPUPower, gs.PowerWatts, gl...)
			g(descGPUTemp, gs.TempCelsius, gl...)
		}
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
