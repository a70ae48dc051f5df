"""Errors of the data layer, under fedhealth.core's tree.

DatasetError (core)
├── DatasetMissingError (core)   a file is absent and cannot be fetched
├── ChecksumError (core)         a file does not match its published checksum
├── SourceUnavailableError       a database or FHIR server cannot be reached or does not answer
│   └── CredentialsRefusedError  it answers, but refuses the site's credentials or permissions
├── UnsafeQueryError             a SQL query that could write: refused before it runs, or by the read-only
│                                transaction it runs in
└── SchemaError                  a source is read but its content does not fit (columns, values, labels,
    │                            a table or a concept that is not there)
    ├── NonNumericColumnError    a feature column holds text (often an id column not declared as one)
    └── UnitMismatchError        an observation's unit is not the one the mapping declares

The agent sends only a failure code for any of them (``dataset_unavailable`` or ``dataset_invalid``); the
message, which may name a host, a table, a file or a value, stays in the site's own log. ``hint`` says what a
site's data engineer can do about it.
"""

from __future__ import annotations

from fedhealth.core import DatasetError


class SourceUnavailableError(DatasetError):
    """A data source (a database, a FHIR server) cannot be reached, or does not answer in time."""

    def __init__(self, message: str, *, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


class CredentialsRefusedError(SourceUnavailableError):
    """The source answers but refuses the credentials (unknown user, wrong password or token) or the
    permission to read what the dataset names."""


class UnsafeQueryError(DatasetError):
    """A SQL query that is not a single read-only SELECT, or that tried to write in its read-only
    transaction. Nothing it asked was done: it is refused before it runs, or rolled back."""

    hint = "a dataset query must be one SELECT (or WITH ... SELECT) statement that only reads"


class SchemaError(DatasetError):
    """A dataset's content does not fit what was asked of it: a column is missing, a value is not a number,
    a label is not binary. The message names the file, and the line and column where it can."""

    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class NonNumericColumnError(SchemaError):
    """A feature column holds a value that is not a number. ``column`` names it, so a caller can suggest
    declaring it as the id column (which is used for consent and never becomes a feature)."""

    def __init__(self, message: str, *, column: str) -> None:
        super().__init__(message)
        self.column = column


class UnitMismatchError(SchemaError):
    """An observation carries a unit other than the one its feature declares: its value is refused rather
    than read on the wrong scale."""

    hint = "convert the observations to the declared unit at the source, or declare the unit they use"
