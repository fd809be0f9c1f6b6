package job

import (
	"strings"
	"testing"
)

// FuzzParse: any bytes as a job file give a Job that validates, or an
// error; never a panic.
func FuzzParse(f *testing.F) {
	good, err := Default().YAML()
	if err != nil {
		f.Fatal(err)
	}
	f.Add([]byte(good))
	f.Add([]byte("version: 1\npreset: mamba-tiny\nmodel:\n  d_model: 1099511627776\n"))
	f.Add([]byte("version: 1\nsteps: -3\n"))
	f.Add([]byte("version: 1\nmodel:\n  mixers: [bmojo, attention, mamba]\n  n_layer: 3\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		j, err := Parse("fuzz.yaml", b)
		if err != nil {
			return
		}
		if err := j.Validate(); err != nil {
			t.Fatalf("Parse accepted a job that does not validate: %v", err)
		}
	})
}

// FuzzDecodeRecords: any bytes under any of the job's keys decode into
// their record or give an error naming the key; never a panic.
func FuzzDecodeRecords(f *testing.F) {
	for _, s := range []string{
		Encode(Ring{Epoch: 3, Members: []RingMember{{ID: "w1", Endpoint: "h:1"}}}),
		Encode(Start{Epoch: 3, Step: 7, Source: "w1", Sync: true}),
		Encode(Progress{Step: 4, Steps: 10, Loss: 1.5}),
		Encode(LedgerEntry{Step: 3, Epoch: 2, Workers: []Consumed{{ID: "w1", Range: Range{Start: 0, Count: 4}, Checksum: "00"}}}),
		Encode(Manifest{Step: 10}),
		`{"epoch": 1e400}`, `[]`, `null`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		for key, v := range map[string]any{
			KeyRing: &Ring{}, KeyStart + "1": &Start{}, KeyProgress: &Progress{}, KeyDone: &Done{},
			KeySpec: &Spec{}, KeyMembers + "w1": &Member{}, LedgerKey(1): &LedgerEntry{},
			CheckpointKey(1): &Manifest{}, KeyReports + "w1": &Report{}, ReadyKey(1, "w1"): &Ready{},
			KeyStats + "w1": &WorkerStats{}, EventKey(1): &Event{},
		} {
			if err := Decode(key, b, v); err != nil && !strings.Contains(err.Error(), key) {
				t.Fatalf("error for %s does not name the key: %v", key, err)
			}
		}
	})
}
