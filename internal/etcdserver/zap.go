package etcdserver

import (
	"fmt"
	"sort"
	"strings"

	"github.com/hashicorp/go-hclog"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// zapLogger returns a zap logger that forwards entries at warn and above to
// log, so etcd's server and client logs join the process's hclog output
// instead of printing JSON on stderr. Info and debug are dropped: etcd logs
// every election and compaction at info.
func zapLogger(log hclog.Logger, level zapcore.Level) *zap.Logger {
	return zap.New(&hclogCore{log: log, level: level})
}

// benign are etcd messages that are expected in normal operation (a clean
// shutdown, the single-node test setup); they go to debug.
var benign = []string{
	"use of closed network connection",
	"Server closed",
	"server closed",
	"Running http and grpc server on single port",
	"simple token is not cryptographically signed",
	// A server closed right after its first start races its storage
	// version check; harmless (etcd-io/etcd issue on "missing term information").
	"missing term information",
}

type hclogCore struct {
	log    hclog.Logger
	level  zapcore.Level
	fields []zapcore.Field
}

func (c *hclogCore) Enabled(l zapcore.Level) bool { return l >= c.level }

func (c *hclogCore) With(fields []zapcore.Field) zapcore.Core {
	return &hclogCore{log: c.log, level: c.level, fields: append(append([]zapcore.Field(nil), c.fields...), fields...)}
}

func (c *hclogCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(e.Level) {
		return ce.AddCore(e, c)
	}
	return ce
}

func (c *hclogCore) Write(e zapcore.Entry, fields []zapcore.Field) error {
	enc := zapcore.NewMapObjectEncoder()
	for _, f := range c.fields {
		f.AddTo(enc)
	}
	for _, f := range fields {
		f.AddTo(enc)
	}
	keys := make([]string, 0, len(enc.Fields))
	for k := range enc.Fields {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	args := make([]any, 0, 2*len(keys))
	for _, k := range keys {
		args = append(args, k, enc.Fields[k])
	}
	text := e.Message + fmt.Sprint(args...)
	for _, b := range benign {
		if strings.Contains(text, b) {
			c.log.Debug(e.Message, args...)
			return nil
		}
	}
	switch {
	case e.Level >= zapcore.ErrorLevel:
		c.log.Error(e.Message, args...)
	default:
		c.log.Warn(e.Message, args...)
	}
	return nil
}

func (c *hclogCore) Sync() error { return nil }
