package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/bmojo/bmojo/internal/launch"

	"github.com/bmojo/bmojo/internal/monitor"
)

func init() {
	var (
		watch, asJSON bool
		addr, token   string
		caFile        string
		k8sJob        string
		kf            kubeFlags
	)
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show a job's progress, ETA, loss, tokens/s and workers (from a coordinator's or monitor's HTTP API)",
		Long: `Show a running job: a progress bar with ETA, the loss, tokens/s, the
ring epoch and the worker table, read from the HTTP API that bmojo train
--workers N (127.0.0.1:8080 by default), bmojo coordinator --http or
bmojo monitor serves. --json prints /api/v1/status as it is.

--k8s JOB shows instead a job launched on Kubernetes: its etcd, coordinator
and worker pods, as bmojo k8s-status does.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if k8sJob != "" {
				kc, ns, err := kf.load("")
				if err != nil {
					return err
				}
				ctx, stop := signalContext()
				defer stop()
				st, err := launch.Status(ctx, kc.REST, ns, k8sJob)
				if err != nil {
					return err
				}
				return st.Write(os.Stdout)
			}
			if token == "" {
				token = os.Getenv("BMOJO_TOKEN")
			}
			url := strings.TrimSuffix(addr, "/")
			if !strings.Contains(url, "://") {
				url = "http://" + url
			}
			url += "/api/v1/status"
			out := cmd.OutOrStdout()
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			client, err := statusClient(caFile)
			if err != nil {
				return err
			}
			show := func() error {
				body, err := fetchStatus(ctx, client, url, token)
				if err != nil {
					return err
				}
				if asJSON {
					_, err = out.Write(body)
					return err
				}
				var s monitor.Status
				if err := json.Unmarshal(body, &s); err != nil {
					return fmt.Errorf("status: %s answered something that is not a status: %w", url, err)
				}
				printStatus(out, s, time.Now())
				return nil
			}
			if !watch {
				return show()
			}
			tick := time.NewTicker(time.Second)
			defer tick.Stop()
			for {
				if !asJSON {
					fmt.Fprint(out, "\033[H\033[2J") // refresh in place
				}
				if err := show(); err != nil {
					fmt.Fprintf(out, "%v\n(retrying every second; Ctrl-C to stop)\n", err)
				}
				select {
				case <-ctx.Done():
					return nil
				case <-tick.C:
				}
			}
		},
	}
	fl := cmd.Flags()
	fl.BoolVarP(&watch, "watch", "w", false, "refresh every second")
	fl.BoolVar(&asJSON, "json", false, "print the /api/v1/status JSON as served")
	fl.StringVar(&addr, "addr", "http://127.0.0.1:8080", "the monitor's address (bmojo train, bmojo coordinator --http, bmojo monitor)")
	fl.StringVar(&token, "token", "", "bearer token (or set BMOJO_TOKEN)")
	fl.StringVar(&caFile, "ca", "", "CA bundle (PEM) that signed an https monitor's certificate, e.g. the job CA")
	fl.StringVar(&k8sJob, "k8s", "", "show this job's Kubernetes state instead (uses your kubeconfig like kubectl)")
	kf.add(fl)
	rootCmd.AddCommand(cmd)
}

// errStatus is the sentinel under every status error a user must act on.
var errStatus = errors.New("status")

// fetchStatus GETs url and turns the failures a user meets into sentences.
func fetchStatus(ctx context.Context, client *http.Client, url, token string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, fmt.Errorf("%w: bad --addr: %w", errStatus, err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%w: cannot reach the monitor at %s (is the job running? give its address with --addr): %w", errStatus, url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, fmt.Errorf("%w: read %s: %w", errStatus, url, err)
	}
	var e struct {
		Error string `json:"error"`
	}
	_ = json.Unmarshal(body, &e)
	switch {
	case resp.StatusCode == http.StatusOK:
		return body, nil
	case resp.StatusCode == http.StatusUnauthorized:
		what := "missing"
		if token != "" {
			what = "wrong"
		}
		return nil, fmt.Errorf("%w: the monitor at %s refused the %s token (%s): give the right one with --token or BMOJO_TOKEN", errStatus, url, what, e.Error)
	case resp.StatusCode == http.StatusNotFound && e.Error != "":
		return nil, fmt.Errorf("%w: %s", errStatus, e.Error)
	default:
		msg := e.Error
		if msg == "" {
			msg = strings.TrimSpace(string(body))
		}
		return nil, fmt.Errorf("%w: %s answered %s: %s", errStatus, url, resp.Status, msg)
	}
}

// printStatus is the terminal view of s.
func printStatus(w io.Writer, s monitor.Status, now time.Time) {
	const width = 30
	filled := int(s.Progress*width + 0.5)
	bar := strings.Repeat("█", filled) + strings.Repeat("░", width-filled)
	eta := "ETA –"
	switch {
	case s.Done:
		eta = "done"
	case s.ETASeconds != nil:
		eta = "ETA " + (time.Duration(*s.ETASeconds) * time.Second).Round(time.Second).String()
	}
	fmt.Fprintf(w, "job %s  epoch %d  ring %d workers\n", s.Job, s.Epoch, s.RingSize)
	fmt.Fprintf(w, "%s %5.1f%%  step %d/%d  %s\n", bar, 100*s.Progress, s.Step, s.Steps, eta)
	val := "–"
	if s.ValLoss != 0 {
		val = fmt.Sprintf("%.4f", s.ValLoss)
	}
	fmt.Fprintf(w, "loss %.4f  val loss %s  %.0f tokens/s  skipped %d", s.Loss, val, s.TokensPerS, s.Skipped)
	if s.LastRecoverySeconds > 0 {
		fmt.Fprintf(w, "  last recovery %.2fs", s.LastRecoverySeconds)
	}
	fmt.Fprintln(w)
	if s.Checkpoint != nil {
		fmt.Fprintf(w, "checkpoint step %d  %s\n", s.Checkpoint.Step, s.Checkpoint.Dir)
	}
	if s.Updated > 0 && !s.Done {
		age := now.Sub(time.Unix(0, int64(s.Updated*1e9)))
		if age > 30*time.Second {
			fmt.Fprintf(w, "no progress for %s\n", age.Round(time.Second))
		}
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "WORKER\tRANK\tSTATE\tSTEP\tSTEP s\tDATA s\tCOMPUTE s\tWAIT s\tOPTIM s\tTOKENS/s\tGRAD NORM\t")
	for _, ws := range s.Workers {
		rank := "-"
		if ws.Rank >= 0 {
			rank = fmt.Sprint(ws.Rank)
		}
		state := ws.State
		if ws.Straggler {
			state += " (straggler)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%.3f\t%.3f\t%.3f\t%.3f\t%.3f\t%.0f\t%.3f\t\n", ws.ID, rank, state, ws.LastStep,
			ws.Step, ws.Data, ws.Compute, ws.Wait, ws.Optimizer, ws.TokensPS, ws.GradNorm)
	}
	tw.Flush()
	if n := len(s.Events); n > 0 {
		fmt.Fprintln(w, "\nrecent events:")
		for _, ev := range s.Events[max(0, n-5):] {
			t := time.Unix(0, int64(ev.TimeUnix*1e9)).Format("15:04:05")
			who := ""
			if ev.WorkerID != "" {
				who = " " + ev.WorkerID
			}
			fmt.Fprintf(w, "  %s  epoch %d  %s%s: %s\n", t, ev.Epoch, ev.Kind, who, ev.Reason)
		}
	}
}

// statusClient is the HTTP client of bmojo status: the system's roots, or
// those of --ca for a monitor whose certificate the job CA signed.
func statusClient(caFile string) (*http.Client, error) {
	if caFile == "" {
		return http.DefaultClient, nil
	}
	pemBytes, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("%w: --ca: %w", errStatus, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pemBytes) {
		return nil, fmt.Errorf("%w: --ca %s holds no PEM certificate", errStatus, caFile)
	}
	return &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool}}}, nil
}
