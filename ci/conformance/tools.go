//go:build tools

// Package tools pins the OCI distribution-spec conformance suite for ci/toolchain, which builds it from
// this wrapper module (the suite has no release tags, so it is pinned by pseudo-version).
package tools

import _ "github.com/opencontainers/distribution-spec/conformance"
