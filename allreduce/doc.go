// Package allreduce owns the gradient all-reduce between workers: a ring
// reduce-scatter followed by a ring all-gather, chunked and pipelined, over
// gRPC streams between ring neighbours (proto/allreduce.proto), or with gRPC
// as the control plane only: between neighbours on the same host through
// shared memory, between hosts (Transport "socket") over plain data sockets
// that the gRPC handshake negotiates and binds.
//
// Layout: schedule.go is the algorithm as a pure plan with no I/O (tested by
// simulating every rank in memory); frame.go is the wire format and the
// pass-through gRPC codec; ring.go is the thin transport that runs a plan;
// shm.go is the same-host data path (slot rings in a shared-memory file,
// negotiated in the gRPC handshake) and sock.go the data-socket path (plain
// connections to the successor's listener, bound to the hop in the same
// handshake); both run the same plan and apply chunks through the same
// checks and loops. tcpref.go is the plain-TCP ring the benchmarks measure
// the others against. A Ring also runs either half of
// the plan alone (ReduceScatter, AllGather); hier.go composes two rings, one
// inside a host and one across hosts, into a hierarchical all-reduce (Hier)
// out of those halves, and defines Collective, which both satisfy.
// The package knows nothing about membership, etcd or the model: the caller
// gives it the ordered peer list and the ring epoch, and re-forms the ring
// (with a higher epoch) after a failure.
//
// # Why every rank ends bitwise identical
//
// Floating-point addition is not associative, so ranks that each summed the
// N contributions themselves, in different orders, could disagree in the
// last bit, and replicas would drift. The ring never does that. Each of the N
// segments is reduced exactly once, on exactly one rank: segment k starts on
// rank k and travels k → k+1 → … → k-1, each hop adding its own
// contribution to the running sum in float32, so its value is
// ((x_k + x_{k+1}) + x_{k+2}) + … in one fixed order that depends only on k
// and N. Rank k-1 (the owner) then finishes it (divides by N for Avg; rounds
// to bfloat16 when that is the wire type), once. All-gather copies the
// owner's bits verbatim to every other rank: a copy of float32 bytes, or a
// bfloat16 value the owner had already rounded to, so widening it back is
// exact. No rank ever combines a segment's values in any other way, so every
// rank ends with the owner's bits for every segment. Chunking and
// pipelining change only when chunks move, never the order of the additions
// within an element. Tests check this bit for bit for 1–8 ranks.
//
// The transport does not enter into it: a chunk that arrives through shared
// memory or a data socket is applied by the same code, in the same order, as
// one that arrives over gRPC, so a ring whose hops mix them ends bitwise
// identical too.
//
// # Failures
//
// Every frame (and every shared-memory slot and data-socket chunk) carries
// the ring epoch; a frame or stream of another epoch is refused (ErrEpoch).
// Each hop has a deadline (Config.HopTimeout): a rank
// that waits longer for the next chunk fails the collective with a
// *PeerError naming its predecessor, the step and the chunk. A rank that
// notices a failure first-hand (a broken stream, a bad frame, a deadline)
// sends an ABORT naming the culprit to its successor, which passes it on,
// so every rank reports the same culprit within about one hop time. After
// any failure the Ring stays broken; the caller builds a new one.
//
// See README.md for the transport measurements behind the defaults.
package allreduce
