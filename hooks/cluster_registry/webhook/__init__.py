"""The pod mutating admission webhook: pure core (``mutate``), Artifact view, recorder, server."""
