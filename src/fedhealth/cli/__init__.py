"""Command line: ``fedhealth`` and its command groups. Thin: each command calls into the packages below."""

from fedhealth.cli._app import app, main

__all__ = ["app", "main"]
