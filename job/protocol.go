// Package job is what every process of a training job shares: the job file
// (job.go: Job, Load, Parse, Diff), and the contract between coordinators
// and workers (this file): the etcd key layout of one job and the JSON
// records stored under it, plus PutSpec (spec.go), which creates a job in
// etcd or checks that it is the same job. It holds no logic beyond naming
// keys, encoding records and checking job files, so both sides (and tests,
// and `bmojo status`) agree on one definition.
//
// # Keys (all under Prefix(job) = "/bmojo/jobs/<job>/")
//
//	spec                      Spec: the job file as YAML plus its hash; written once by `bmojo train`
//	members/<worker-id>       Member, attached to the worker's lease (TTL a few seconds)
//	election/                 coordinator leader election (etcd concurrency.Election)
//	ring                      Ring: the current epoch (only grows), its members in rank order
//	ready/<epoch>/<worker-id> Ready: a member has stopped training for this epoch, at its local step
//	start/<epoch>             Start: the step the epoch starts at and which member holds that state
//	reports/<worker-id>       Report: a worker saw a peer fail (the coordinator drops the suspect)
//	ledger/<step>             LedgerEntry: what each worker of a committed step reports it read (fenced, written once)
//	progress                  Progress: the latest committed step, loss, tokens/s (rank 0 writes)
//	stats/<worker-id>         WorkerStats: one worker's latest step timings (about once a second)
//	checkpoints/<step>        Manifest: a durable checkpoint (files with sizes and SHA-256)
//	checkpoints/latest        the step of the newest committed Manifest, as decimal text
//	done                      Done: the job finished (final step, val loss)
//	events/<seq>              Event: a membership event the coordinator leader saw (the newest MaxEvents kept)
//
// # Epoch protocol
//
// The coordinator leader watches members/ and reports/. When the member set
// changes (join, lease expiry, a reported failure) it writes ring with epoch
// e+1 and the new members. Every member, on seeing the new epoch, aborts or
// finishes its in-flight step (never half-applies one), then writes
// ready/<e+1>/<id> with its completed step count. When all members of e+1
// are ready (or the ones that are not are dropped after ReadyTimeout, which
// starts epoch e+2), the coordinator writes start/<e+1> = {step: max of the
// ready steps, source: a member at that step}. Members behind that step
// (new joiners, or ranks whose all-reduce failed where others completed)
// take source's parameters and optimizer state: every member connects the
// all-reduce ring at epoch e+1 and sums a buffer that is zero everywhere but
// on source, an exact broadcast (x + 0 = x); then all train from step.
//
// A step's global batch is the sample positions [step·GB, (step+1)·GB) of the
// deterministic sampler, split contiguously over the ring's ranks, so which
// samples a step consumes does not depend on who computes it: across any
// failure or resize every sample is consumed exactly once.
package job

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"

	"github.com/bmojo/bmojo/internal/fsutil"
)

// Prefix is the root of one job's keys.
func Prefix(job string) string { return "/bmojo/jobs/" + job + "/" }

// Key names, relative to Prefix.
const (
	KeySpec           = "spec"
	KeyMembers        = "members/"
	KeyElection       = "election/"
	KeyRing           = "ring"
	KeyReady          = "ready/"
	KeyStart          = "start/"
	KeyReports        = "reports/"
	KeyLedger         = "ledger/"
	KeyProgress       = "progress"
	KeyStats          = "stats/"
	KeyCheckpoints    = "checkpoints/"
	KeyLatestCkpt     = "checkpoints/latest"
	KeyDone           = "done"
	KeyEvents         = "events/"
	MaxEvents         = 1000 // events/ keeps the newest this many
	ProtocolVersion   = 1
	DefaultLeaseTTL   = 3 // seconds
	DefaultReadyGrace = 5 // seconds a ring member has to report ready
)

// ReadyKey is ready/<epoch>/<id>.
func ReadyKey(epoch uint64, id string) string {
	return KeyReady + strconv.FormatUint(epoch, 10) + "/" + id
}

// StartKey is start/<epoch>.
func StartKey(epoch uint64) string { return KeyStart + strconv.FormatUint(epoch, 10) }

// LedgerKey is ledger/<step>, zero-padded so keys sort by step.
func LedgerKey(step int) string { return fmt.Sprintf("%s%010d", KeyLedger, step) }

// CheckpointKey is checkpoints/<step>, zero-padded.
func CheckpointKey(step int) string { return fmt.Sprintf("%s%010d", KeyCheckpoints, step) }

// EventKey is events/<seq>, zero-padded so keys sort by sequence number.
func EventKey(seq uint64) string { return fmt.Sprintf("%s%020d", KeyEvents, seq) }

// Event is one membership event, written by the coordinator leader so any
// process (the monitor, `bmojo status`) can show it. Seq grows by one per
// event across leaders: a new leader continues after the newest stored one.
type Event struct {
	Seq      uint64  `json:"seq"`
	TimeUnix float64 `json:"time"`
	// Kind is a coordinator Notice kind (joined, left, reported, refused,
	// not_ready, waiting, ignored), or ring (a ring was published), started
	// (an epoch started) or leader_elected.
	Kind     string `json:"kind"`
	WorkerID string `json:"worker_id,omitempty"`
	Epoch    uint64 `json:"epoch"`
	Reason   string `json:"reason"`
	Leader   string `json:"leader"` // the coordinator replica that wrote it
	// RecoverySeconds, on started events, is the time from the membership
	// change to the epoch's start being published.
	RecoverySeconds float64 `json:"recovery_seconds,omitempty"`
}

// Spec is the job every process of the job runs.
type Spec struct {
	Protocol int    `json:"protocol"`
	YAML     string `json:"yaml"`     // the resolved job file (Job as YAML)
	Hash     string `json:"hash"`     // SHA-256 of YAML: members with another hash are refused
	Workers  int    `json:"workers"`  // expected ring size at start (the coordinator waits for it once)
	MinRing  int    `json:"min_ring"` // smallest ring that may train (default 1)
	CkptDir  string `json:"checkpoint_dir"`
	Created  string `json:"created"`
	CodeHash string `json:"code"` // build identity; members of another build are refused
}

// Member is one worker's registration.
type Member struct {
	ID         string `json:"id"`
	Endpoint   string `json:"endpoint"` // host:port of its all-reduce and state-transfer gRPC server
	Device     string `json:"device"`   // "cpu" or the GPU name and UUID
	PID        int    `json:"pid"`
	SpecHash   string `json:"spec_hash"`
	CodeHash   string `json:"code"`
	Protocol   int    `json:"protocol"`
	Registered string `json:"registered"` // RFC 3339
	// Host names the machine the worker runs on (its --host: the
	// hostname, on Kubernetes the node's name). Workers with the same
	// host are ranked next to each other, and a ring whose hosts all hold
	// the same number of them reduces hierarchically (Job.AllReduce).
	Host string `json:"host,omitempty"`
	// LocalEndpoint is host:port of the worker's second all-reduce
	// listener, which serves the ring of its host's workers when the
	// all-reduce is hierarchical (the ring across hosts uses Endpoint).
	LocalEndpoint string `json:"local_endpoint,omitempty"`
}

// RingMember is one rank of a ring: Member's fields the ranks need.
type RingMember struct {
	ID            string `json:"id"`
	Endpoint      string `json:"endpoint"`
	Host          string `json:"host,omitempty"`
	LocalEndpoint string `json:"local_endpoint,omitempty"`
	// Device is the member's Device ("cpu", or the GPU's name and UUID):
	// every rank sees every rank's, so choices that must agree across the
	// ring (a GPU-resident all-reduce and its chunk size) agree.
	Device string `json:"device,omitempty"`
}

// Ring is the published ring. Epoch only grows; it is the fencing token of
// every all-reduce message.
type Ring struct {
	Epoch uint64 `json:"epoch"`
	// Members in rank order: ordered by host, then id, so each host's
	// members are contiguous (the hierarchical all-reduce needs that).
	Members []RingMember `json:"members"`
	Reason  string       `json:"reason"` // why this epoch started (joined, lease expired, reported, ...)
}

// Rank returns id's rank in r, or -1.
func (r Ring) Rank(id string) int {
	for i, m := range r.Members {
		if m.ID == id {
			return i
		}
	}
	return -1
}

// Ready says a ring member stopped for an epoch with Step steps completed.
type Ready struct {
	Epoch uint64 `json:"epoch"`
	Step  int    `json:"step"`
}

// Start releases an epoch: train from Step; members behind it copy the
// state of Source first.
type Start struct {
	Epoch  uint64 `json:"epoch"`
	Step   int    `json:"step"`
	Source string `json:"source"` // member id holding the state at Step
	// Sync is true when some member reported a step below Step (or is new):
	// then every member joins a broadcast of Source's parameters and
	// optimizer state before training.
	Sync bool `json:"sync"`
}

// Report is a worker's claim that a peer failed during a collective.
type Report struct {
	Epoch    uint64 `json:"epoch"`
	Reporter string `json:"reporter"`
	Suspect  string `json:"suspect"`
	Error    string `json:"error"`
}

// Range is a contiguous run of sample positions [Start, Start+Count).
type Range struct {
	Start int `json:"start"`
	Count int `json:"count"`
}

// Consumed is one worker's own report of what it read for a step: its
// sample positions and a checksum of the token windows it actually trained
// on. Every rank's report travels in the step's own collective (the one
// that sums the loss), so a rank that applied the step holds every rank's
// report, and any of them can commit the entry.
type Consumed struct {
	ID   string `json:"id"`
	Rank int    `json:"rank"`
	Range
	// Checksum is FNV-1a 64 (hex, 16 digits) over the windows the worker
	// fed the model, in position order: each window's SeqLen+1 tokens (the
	// inputs, then the last target) as 4-byte little-endian integers.
	Checksum string `json:"checksum"`
}

// LedgerEntry records what a committed step consumed. Ledger writes are
// fenced: a worker commits entries in a transaction that holds only while
// the ring record is the one it is a member of (its mod revision), and
// only if ledger/<step> does not exist yet, so a stale ring writes nothing
// and an entry is never rewritten. Every member holds the entries of the
// steps it applied: rank 0 commits them as it goes, the others when their
// ring changes or they exit (the entries still missing then), so an entry
// survives the death of any one of them.
type LedgerEntry struct {
	Step    int        `json:"step"`
	Epoch   uint64     `json:"epoch"`   // the ring the step ran in
	Workers []Consumed `json:"workers"` // rank order: each rank's own report
	Loss    float64    `json:"loss"`    // the step's global training loss
	// Time is when the committing worker finished the step (Unix seconds,
	// its clock).
	Time   float64 `json:"time,omitempty"`
	Writer string  `json:"writer,omitempty"` // the worker that committed the entry
}

// Progress is the job's latest committed step.
type Progress struct {
	Step        int     `json:"step"`
	Steps       int     `json:"steps"`
	Epoch       uint64  `json:"epoch"`
	Loss        float64 `json:"loss"`
	ValLoss     float64 `json:"val_loss,omitempty"`
	TokensPerS  float64 `json:"tokens_per_s"`
	Workers     int     `json:"workers"`
	Skipped     int     `json:"skipped_steps"`
	UpdatedUnix float64 `json:"updated"`
}

// WorkerStats is one worker's view of its latest step, for monitoring. The
// all-reduce wait is the time from the end of backward to the last bucket's
// arrival: a slow rank shows a short wait while everyone else waits on it.
type WorkerStats struct {
	ID          string  `json:"id"`
	Rank        int     `json:"rank"`
	Epoch       uint64  `json:"epoch"`
	Step        int     `json:"step"`
	Device      string  `json:"device"`
	StepSeconds float64 `json:"step_seconds"`    // whole step, data to optimizer
	DataSeconds float64 `json:"data_seconds"`    // sampling the local batch
	ComputeSec  float64 `json:"compute_seconds"` // forward + backward
	WaitSeconds float64 `json:"allreduce_wait_seconds"`
	// CommSeconds is how long the step's all-reduces were in flight,
	// ExposedSeconds the part of it backward did not hide (train.StepStats).
	CommSeconds    float64   `json:"comm_seconds,omitempty"`
	ExposedSeconds float64   `json:"comm_exposed_seconds,omitempty"`
	OptimSeconds   float64   `json:"optimizer_seconds"`
	TokensPerS     float64   `json:"tokens_per_s"` // this worker's tokens
	Loss           float64   `json:"loss"`         // global loss of the step
	GradNorm       float64   `json:"grad_norm"`
	Skipped        int       `json:"skipped_steps"`
	CheckpointSec  float64   `json:"last_checkpoint_seconds,omitempty"`
	UpdatedUnix    float64   `json:"updated"`
	GPU            *GPUStats `json:"gpu,omitempty"` // NVML sample; absent on CPU workers
	// ArrivalUnix is when this rank's last gradient bucket entered the ring
	// (its backward ended) in step Step, wall clock: comparing ranks of one
	// step names the one the all-reduce waits for.
	ArrivalUnix float64 `json:"arrival_unix,omitempty"`
}

// GPUStats is one NVML sample of a worker's GPU.
type GPUStats struct {
	UUID         string  `json:"uuid"`
	UtilPercent  float64 `json:"util_percent"`
	MemUsedBytes float64 `json:"mem_used_bytes"`
	MemTotal     float64 `json:"mem_total_bytes"`
	PowerWatts   float64 `json:"power_watts"`
	TempCelsius  float64 `json:"temp_celsius"`
}

// File is one checkpoint file in a Manifest.
type File struct {
	Name   string `json:"name"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

// Manifest is a committed checkpoint: it is written in one transaction,
// only after every file is durable.
type Manifest struct {
	Step   int    `json:"step"`
	Epoch  uint64 `json:"epoch"`
	Dir    string `json:"dir"`
	Files  []File `json:"files"`
	Config string `json:"config"` // model config JSON
}

// Done marks the end of the job.
type Done struct {
	Step    int     `json:"step"`
	ValLoss float64 `json:"val_loss"`
	Loss    float64 `json:"loss"`
}

// Encode is json.Marshal for records: plain structs of numbers, strings and
// maps of them, which always encode.
func Encode(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

// Decode parses a record, naming the key on error.
func Decode(key string, b []byte, v any) error {
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("cluster: %s: malformed record: %w", key, err)
	}
	return nil
}

// MemberID extracts <id> from a members/<id> key (relative or absolute).
func MemberID(key string) string {
	i := strings.LastIndex(key, "/")
	return key[i+1:]
}

var codeHash struct {
	once sync.Once
	v    string
}

// CodeHash identifies this build: FileHash of the running executable.
// Processes of one job must run the same build (their kernels and data
// order must agree bit for bit), so members with another hash are refused.
func CodeHash() string {
	codeHash.once.Do(func() {
		codeHash.v = "unknown"
		if exe, err := os.Executable(); err == nil {
			if h, err := FileHash(exe); err == nil {
				codeHash.v = h
			}
		}
	})
	return codeHash.v
}

// FileHash is the build identity of an executable file (a SHA-256 prefix).
func FileHash(path string) (string, error) {
	d, err := fsutil.HashFile(path)
	if err != nil {
		return "", err
	}
	return d.SHA256[:16], nil
}

// SpecHash is the hash of a job's resolved YAML.
func SpecHash(yaml string) string {
	h := sha256.Sum256([]byte(yaml))
	return hex.EncodeToString(h[:])[:16]
}
