"""Files: CSV and Parquet tables, read into a :class:`SourceTable` (see ``_table`` for what follows).

CSV text is split into cells with Python's ``csv`` module, not pandas' C parser: the parser fills a short
row with empty cells and renames a repeated header (``a``, ``a.1``) without a word, while ``csv`` lets us
refuse both and name each row by its line in the file. The cells then go into a pandas frame of text, and
every value is parsed by the shared table code. Parquet files are read with pyarrow (through pandas) and
keep their column types.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import pandas as pd

from fedhealth.core import DatasetError, DatasetMissingError
from fedhealth.data._dataset import TabularDataset
from fedhealth.data._errors import SchemaError
from fedhealth.data._schema import DatasetSchema
from fedhealth.data._table import SourceTable, TableOptions, read_table


class FileFormat(StrEnum):
    CSV = "csv"
    PARQUET = "parquet"

    @classmethod
    def of(cls, path: Path) -> FileFormat | None:
        suffix = path.suffix.lower()
        if suffix in (".parquet", ".pq"):
            return cls.PARQUET
        if suffix in (".csv", ".txt", ".tsv"):
            return cls.CSV
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class CsvOptions:
    """How to read a CSV file: the label column, an optional patient-id column, the held-out fraction and its
    seed, whether to standardize features with the training part's mean and std, a declared schema, and the
    label's classes."""

    label: str
    id_column: str | None = None
    test_fraction: float = 0.3
    seed: int = 0
    standardize: bool = True
    schema: DatasetSchema | None = None
    classes: int = 2  # the label's classes (labels 0 to classes - 1)

    def table_options(self) -> TableOptions:
        return TableOptions(
            label=self.label,
            id_column=self.id_column,
            schema=self.schema,
            test_fraction=self.test_fraction,
            seed=self.seed,
            standardize=self.standardize,
            classes=self.classes,
        )


def read_csv_dataset(path: Path, options: CsvOptions) -> TabularDataset:
    """Read, validate, order by id, split (stratified, as FLamby splits) and standardize a CSV file."""
    return read_table(read_file_table(path, FileFormat.CSV), options.table_options())


def read_file_table(path: Path, fmt: FileFormat) -> SourceTable:
    """A file's table: :class:`DatasetMissingError` if absent, :class:`SchemaError` if not a ``fmt`` file."""
    if not path.is_file():
        raise DatasetMissingError(f"{fmt.value.upper()} file {path} does not exist")
    try:
        if fmt is FileFormat.PARQUET:
            return _parquet(path)
        return _csv(path)
    except UnicodeDecodeError as exc:
        raise SchemaError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except csv.Error as exc:
        raise SchemaError(f"{path}: not a readable CSV file ({exc})") from exc
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc.strerror or exc})") from exc


def _csv(path: Path) -> SourceTable:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        header = next(reader, None)
        if header is None:
            raise SchemaError(f"{path}: the file is empty (a header row is required)")
        columns = [c.strip() for c in header]
        if len(set(columns)) != len(columns):
            raise SchemaError(f"{path}: the header repeats a column name")
        records: list[list[str]] = []
        lines: list[str] = []
        width = len(columns)
        for record in reader:
            if len(record) != width:
                if not record or all(not c.strip() for c in record):
                    continue
                raise SchemaError(
                    f"{path}: line {reader.line_num} has {len(record)} fields, the header has {width}"
                )
            if not any(record) or all(not c.strip() for c in record):
                continue
            records.append(record)
            lines.append(f"line {reader.line_num}")
    # one transpose of the rows (a C loop) instead of appending each cell to its column
    cells = list(zip(*records, strict=True)) if records else [() for _ in columns]
    frame = pd.DataFrame(
        {c: pd.Series(v, dtype="object") for c, v in zip(columns, cells, strict=True)}, copy=False
    )
    return SourceTable(name=path.stem, where=str(path), frame=frame, text=True, row_labels=lines)


def _parquet(path: Path) -> SourceTable:
    import pyarrow as pa  # pyarrow is large: loaded only for Parquet files

    try:
        frame = pd.read_parquet(path, engine="pyarrow")
    except (pa.ArrowException, ValueError) as exc:
        raise SchemaError(f"{path}: not a readable Parquet file ({exc})") from exc
    return SourceTable(name=path.stem, where=str(path), frame=frame, text=False)
