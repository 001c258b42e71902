//go:build tools

// Package tools pins what ci/toolchain needs to generate the HelmRelease CRD: helm-controller's API
// module (the controller's own module is not served by the module proxy, so its CRD YAML is not
// available) and controller-gen, which generates the schema from the API types as upstream does.
package tools

import (
	_ "github.com/fluxcd/helm-controller/api/v2"
	_ "sigs.k8s.io/controller-tools/cmd/controller-gen"
)
