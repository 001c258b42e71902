"""The registry on every node's loopback: where a stock container runtime pulls rewritten images."""
