//go:build tools

// Package tools pins Flux's kustomize-controller for ci/toolchain, which builds it from this wrapper module
// (its own go.mod has replace directives, so `go install pkg@version` refuses it).
package tools

import _ "github.com/fluxcd/kustomize-controller"
