"""The pod mutating admission webhook: pure core (``mutate``), Artifact view, server (no writes), and
the pod watch (``pods``) feeding the Artifact recorder."""
