// Package data owns everything between text on disk and the token batches a
// training step consumes: reading inputs (files, directories, globs, .gz,
// .jsonl, stdin) and tokenizing them in parallel into shards (Prepare), the
// bundled public-domain corpus, the binary token shard format and its dataset
// manifest, and the deterministic sampler that decides which window of
// tokens each worker sees at each step. The tokenizers themselves are
// package tokenizer's; ByteTokenizer stays here for its callers.
//
// It does not know about models, devices or workers' ranks beyond the
// arithmetic in Sampler; it performs no logging and never exits. Every error
// wraps one of the sentinels below so callers can branch with errors.Is while
// showing the full message, which names the file and says what to do.
package data
