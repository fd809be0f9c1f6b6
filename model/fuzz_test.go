package model

import "testing"

// FuzzParseConfig: the model config a checkpoint carries (JSON in its
// metadata) is a Config that validates, or an error; never a panic, and
// never a config whose layout would not fit MaxParams.
func FuzzParseConfig(f *testing.F) {
	c, err := Preset("bmojo-tiny")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(ConfigMetadata(c)[ConfigKey])
	f.Add(`{"vocab_size": 1099511627776, "d_model": 64}`)
	f.Add(`{"d_model": -1}`)
	f.Fuzz(func(t *testing.T, js string) {
		c, err := ParseConfig(js)
		if err != nil {
			return
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("ParseConfig accepted a config that does not validate: %v", err)
		}
		if n := NewLayout(c).Total; n > MaxParams {
			t.Fatalf("accepted %d parameters", n)
		}
	})
}
