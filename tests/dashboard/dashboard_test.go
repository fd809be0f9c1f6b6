// Package dashboard drives the monitor's dashboard in a real browser
// (Debian's chromium, through chromedp) during a real two-worker job: the
// loss chart fills, both workers are listed, a SIGKILLed worker shows up as
// down in the worker table and in the membership event log. Screenshots go
// to $BMOJO_ARTIFACTS (or the test's temp dir). Without chromium the test
// skips, saying so.
package dashboard

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/hashicorp/go-hclog"

	"github.com/bmojo/bmojo/internal/localrun"
	"github.com/bmojo/bmojo/internal/testbin"
	"github.com/bmojo/bmojo/internal/testlog"
	"github.com/bmojo/bmojo/job"
	"github.com/bmojo/bmojo/model"
)

const chromium = "/usr/bin/chromium"

var bmojoBin string

func TestMain(m *testing.M) {
	flag.Parse()
	_, err := os.Stat(chromium)
	testbin.Main(m.Run, &bmojoBin, err != nil || testing.Short()) // without chromium the test skips and says why
}

func TestDashboardLiveRun(t *testing.T) {
	if _, err := os.Stat(chromium); err != nil {
		t.Skipf("SKIP: %s not found (apt-get install chromium): the dashboard browser test needs it", chromium)
	}
	if testing.Short() {
		t.Skip("SKIP: -short: the dashboard browser test runs a real job")
	}
	artifacts := os.Getenv("BMOJO_ARTIFACTS")
	if artifacts == "" {
		artifacts = t.TempDir()
	}
	if err := os.MkdirAll(artifacts, 0o755); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()

	j := job.Default()
	j.Name = "dashboard-test"
	mc, err := model.Preset("bmojo-tiny")
	if err != nil {
		t.Fatal(err)
	}
	mc.SeqLen = 64
	mc.Window, mc.FadingWindow, mc.Chunk, mc.Memory = 16, 16, 16, 16
	j.Model, j.Steps, j.BatchSize = mc, 400, 8
	j.EvalEvery, j.EvalBatches, j.CheckpointEvery = 10, 1, 50
	j.CheckpointDir = t.TempDir()

	var (
		mu    sync.Mutex
		procs = map[string]*os.Process{}
		url   = make(chan string, 1)
	)
	runCtx, stopRun := context.WithCancel(ctx)
	runDone := make(chan error, 1)
	go func() {
		_, err := localrun.Run(runCtx, j, localrun.Options{
			Workers: 2, Executable: bmojoBin, HTTP: "127.0.0.1:0", CoordinatorLevel: "warn",
			Logger: testlog.New(t, hclog.Warn).Named("run"),
			OnHTTP: func(u string) { url <- u },
			OnWorker: func(id string, p *os.Process) {
				mu.Lock()
				procs[id] = p
				mu.Unlock()
			},
		})
		runDone <- err
	}()
	defer func() { stopRun(); <-runDone }()
	var base string
	select {
	case base = <-url:
	case err := <-runDone:
		t.Fatalf("run ended before the monitor listened: %v", err)
	case <-ctx.Done():
		t.Fatal("no monitor URL")
	}
	t.Logf("dashboard at %s", base)

	alloc, cancelAlloc := chromedp.NewExecAllocator(ctx,
		chromedp.ExecPath(chromium), chromedp.Headless, chromedp.NoSandbox, chromedp.DisableGPU,
		chromedp.Flag("disable-background-networking", true), chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true), chromedp.NoFirstRun, chromedp.NoDefaultBrowserCheck,
		chromedp.WindowSize(1440, 1100))
	defer cancelAlloc()
	browser, cancelBrowser := chromedp.NewContext(alloc)
	defer cancelBrowser()
	if err := chromedp.Do(browser, chromedp.Navigate(base)); err != nil {
		t.Fatalf("load the dashboard: %v", err)
	}

	// until evaluates a JS boolean expression every 200 ms until it holds.
	until := func(d time.Duration, what, expr string) {
		t.Helper()
		deadline := time.Now().Add(d)
		for {
			ok, err := chromedp.Run(browser, chromedp.Evaluate[bool](expr))
			if err != nil {
				t.Fatalf("evaluate %s: %v", what, err)
			}
			if ok {
				return
			}
			select {
			case err := <-runDone:
				runDone <- err
				t.Fatalf("run ended while waiting for %s: %v", what, err)
			default:
			}
			if time.Now().After(deadline) {
				conn, _ := chromedp.Run(browser, chromedp.Text("#conn"))
				t.Fatalf("timed out after %s waiting for %s (dashboard says %q)", d, what, conn)
			}
			if err := chromedp.Do(browser, chromedp.Sleep(200*time.Millisecond)); err != nil {
				t.Fatal(err)
			}
		}
	}
	shot := func(name string) {
		t.Helper()
		png, err := chromedp.Run(browser, chromedp.FullScreenshot(100))
		if err != nil {
			t.Fatalf("screenshot: %v", err)
		}
		p := filepath.Join(artifacts, name)
		if err := os.WriteFile(p, png, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("screenshot: %s", p)
	}

	const minPoints = 20
	t0 := time.Now()
	until(60*time.Second, fmt.Sprintf("a loss chart of %d points and both workers up", minPoints), fmt.Sprintf(
		`Number(document.getElementById("losschart").dataset.points) >= %d &&
		 document.querySelectorAll('#workers tr[data-state="up"]').length === 2 &&
		 document.querySelector('#events tr[data-kind="started"]') !== null`, minPoints))
	t.Logf("chart and workers shown after %s", time.Since(t0).Round(time.Millisecond))
	shot("dashboard-running.png")

	mu.Lock()
	victim := procs["worker-1"]
	mu.Unlock()
	if victim == nil {
		t.Fatal("worker-1 was never started")
	}
	t0 = time.Now()
	if err := victim.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	until(30*time.Second, "worker-1 down in the table and its departure in the event log",
		`document.querySelector('#workers tr[data-worker="worker-1"][data-state="down"]') !== null &&
		 document.querySelector('#events tr[data-worker="worker-1"][data-kind="left"], #events tr[data-worker="worker-1"][data-kind="reported"], #events tr[data-worker="worker-1"][data-kind="not_ready"]') !== null &&
		 document.querySelectorAll('#workers tr[data-state="up"]').length === 1`)
	t.Logf("SIGKILL -> dashboard shows worker-1 down: %s", time.Since(t0).Round(time.Millisecond))
	// Let the survivor's new epoch start so the screenshot shows the recovery.
	until(20*time.Second, "the epoch after the kill started and training went on",
		`[...document.querySelectorAll('#events tr[data-kind="started"]')].length >= 2 &&
		 Number(document.getElementById("losschart").dataset.points) >= 40`)
	shot("dashboard-worker-killed.png")
}
