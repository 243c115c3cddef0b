"""The ingress transports, one sub-package each (``tcp``, ``http``, ``nats``), all of the same shape:
``_protocol`` (sans-IO), ``_server``, ``_client`` and ``_plugin`` (entry point group
``trio_ingress.transports``)."""
