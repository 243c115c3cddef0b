"""Shared set-up: every test runs under Trio (trio_mode); logs are produced at every level but rendered
nowhere, so ``structlog.testing.capture_logs()`` sees them and the test output stays clean."""

from __future__ import annotations

import structlog

structlog.configure(
    processors=[structlog.processors.add_log_level],
    logger_factory=structlog.ReturnLoggerFactory(),
    cache_logger_on_first_use=False,
)
