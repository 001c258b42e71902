"""cluster-registry: an in-cluster image registry for Kubernetes."""

__version__ = "0.1.0"
