"""Operations: what the running gateway does for the people who run it.

``service`` (the operations service, :class:`~gateway.ops.service.Operations`, used by
both the control socket and remote management), ``command_path`` (commands from the
broker to the units), ``runs`` (a technician's test and scan), ``storage`` (a failing
disk, pruning), ``routes`` and ``control*`` (the local control socket), ``lookup`` (a
technician's request checked), ``technician``, ``health``, ``telemetry`` and
``liveview``.  Nothing is imported here: the CLI imports ``control`` at start-up and
must not pay for the rest; the agent imports ``runs`` and ``technician`` only on a
technician's first request (``service.TECHNICIAN_RUNS``).
"""
