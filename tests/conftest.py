"""Imported before any test module: ``import fedhealth`` turns onnxruntime's telemetry off, which it reads
once when it is imported, and several test modules import onnxruntime themselves (docs/security.md,
"Nothing phones home")."""

import fedhealth  # noqa: F401
