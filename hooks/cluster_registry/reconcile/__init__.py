"""The artifact and component reconcilers.

Pure core (no I/O, time passed in): :mod:`.status` (Artifact status, conditions, backoff, planning),
:mod:`.queue` (a deduplicating delaying work queue), :mod:`.component_status` (a Component's desired
Artifacts and status). Thin adapters (Kubernetes I/O and list+watch are the package's
:mod:`cluster_registry.kubeio`): :mod:`.artifacts` and :mod:`.components` (the controllers), :mod:`.helm` (``helm template``), :mod:`.cli`.
"""
