package model

import (
	"encoding/json"
	"fmt"
)

// The checkpoint package stores a model as named tensors (Layout: the name,
// shape and offset of each tensor in the flat parameter vector) plus its
// Config as JSON; this file owns that naming and that JSON, never a file
// format.

// ConfigKey is the safetensors metadata key holding the config JSON (docs/model.md §7).
const ConfigKey = "config"

// ConfigMetadata encodes c under ConfigKey.
func ConfigMetadata(c Config) map[string]string {
	b, _ := json.Marshal(c) // a struct of numbers and strings always encodes
	return map[string]string{ConfigKey: string(b)}
}

// ParseConfig decodes and validates a config stored by ConfigMetadata.
func ParseConfig(js string) (Config, error) {
	var c Config
	if err := json.Unmarshal([]byte(js), &c); err != nil {
		return Config{}, fmt.Errorf("%w: config JSON: %v", ErrConfig, err)
	}
	if err := c.Validate(); err != nil {
		return Config{}, err
	}
	return c, nil
}
