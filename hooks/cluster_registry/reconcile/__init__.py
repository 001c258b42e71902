"""The artifact and component reconcilers.

Pure core (no I/O, time passed in): :mod:`.status` (Artifact status, conditions, backoff, planning),
:mod:`.queue` (a deduplicating delaying work queue), :mod:`.component_status` (a Component's desired
Artifacts and status). Thin adapters: :mod:`.kubeio` (Kubernetes), :mod:`.informer` (list+watch),
:mod:`.artifacts` and :mod:`.components` (the controllers), :mod:`.helm` (``helm template``), :mod:`.cli`.
"""
