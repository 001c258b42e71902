"""Install-time hooks: ``validate`` (pre-install/pre-upgrade), ``preload`` (early loading), and
side loading from a drive: ``export`` writes OCI image layouts, ``sideload`` imports them.

Each command keeps a pure core (``checks``, ``values``, ``cron``, ``progress``) apart from the thin
adapters that talk to Kubernetes and registries. OCI layouts and docker archives: ``oci.layout``;
quantities and durations: ``units``.
"""
