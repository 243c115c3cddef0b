"""The ingress transports: one sub-package per transport (``tcp`` now; ``http`` and ``nats`` follow)."""
