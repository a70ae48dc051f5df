"""Errors of the data layer, under fedhealth.core's tree.

DatasetError (core)
├── DatasetMissingError (core)   a file is absent and cannot be fetched
├── ChecksumError (core)         a file does not match its published checksum
└── SchemaError                  a file is present but its content does not fit (columns, values, labels)
    └── NonNumericColumnError    a feature column holds text (often an id column not declared as one)
"""

from __future__ import annotations

from fedhealth.core import DatasetError


class SchemaError(DatasetError):
    """A dataset's content does not fit what was asked of it: a column is missing, a value is not a number,
    a label is not binary. The message names the file, and the line and column where it can."""


class NonNumericColumnError(SchemaError):
    """A feature column holds a value that is not a number. ``column`` names it, so a caller can suggest
    declaring it as the id column (which is used for consent and never becomes a feature)."""

    def __init__(self, message: str, *, column: str) -> None:
        super().__init__(message)
        self.column = column
