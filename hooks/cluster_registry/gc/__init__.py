"""Garbage collection of the cluster registry.

``threshold`` and ``select`` are the pure core (no I/O, time passed in); ``storage`` reads the
filesystem driver's tree, ``registry`` deletes through the distribution API, ``cluster`` reads and
writes Kubernetes objects, ``lock`` holds the GC Lease (the gates' write lock), ``sweep`` runs
distribution's mark online and sweeps inside the window (its docstring has the design), ``run``
strings the phases together and ``cli`` is the command.
"""
