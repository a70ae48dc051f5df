"""Image datasets: a folder of PNG/JPEG files, or of DICOM files (``_dicom``), with a labels CSV.

    images:///abs/folder?labels=/abs/labels.csv&size=28[&channels=1|3][&test_fraction=0.3&seed=0]
    dicom:///abs/folder?labels=/abs/labels.csv&size=28[&window=CENTER:WIDTH][&allow_tags=A,B][&test_fraction=0.3&seed=0]

The labels CSV (default ``labels.csv`` in the folder) has a header with the columns ``patient_id``,
``file`` (relative to the folder) and ``label`` (0 or 1): one image per patient, since a row's patient id
is what consent filtering matches. Every image is read, turned into grey levels (or RGB with
``channels=3``) in [0, 1], resized to ``size`` x ``size`` (bilinear) and flattened in (channel, row,
column) order into one row of a :class:`~fedhealth.data.TabularDataset`, whose features are named
``px0``, ``px1``, ... (the ``torch`` recipe reshapes them). The split is the tabular one (stratified,
``test_fraction``, ``seed``); pixels are not standardized.

Every file is checked before any is used: an unreadable or corrupt image, a DICOM file that is not an
image, an image with no row in the labels CSV, a row naming an absent file or holding a label other than
0/1 are all collected and reported as one :class:`~fedhealth.data.SchemaError` line that names each file
(relative to the folder): ``fedhealth site dataset check`` prints it at the site; a task on such a dataset
is refused with ``dataset_invalid`` alone, before any training or privacy charge.

Pillow and pydicom are imported only when a folder is read (the ``imaging`` extra).
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote

import numpy as np

from fedhealth.core import ConfigError
from fedhealth.data._connector import DatasetURI
from fedhealth.data._dataset import TabularDataset, split_indices
from fedhealth.data._errors import SchemaError
from fedhealth.data._quality import QualityReport, _numeric

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_LABEL_COLUMNS = ("patient_id", "file", "label")
_SHOWN_PROBLEMS = 10
MAX_IMAGES = 1_000_000

# one file's grey (channels, h, w) array in [0, 1], or a problem sentence naming no value
Reader = Callable[[Path, int], np.ndarray]
# one file's label (0 or 1) read from the file itself (a DICOM tag), or a problem naming no value
Labeler = Callable[[Path], int]


class ImageProblem(Exception):
    """Why one file cannot be used, in words that name no patient value (the caller adds the file)."""


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """A (channels, h, w) float array in [0, 1] resized to (channels, size, size), bilinear (Pillow)."""
    from PIL import Image

    if image.shape[1:] == (size, size):
        return image.astype(np.float64)
    planes = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F").resize(
                (size, size), Image.Resampling.BILINEAR
            ),
            dtype=np.float64,
        )
        for plane in image
    ]
    return np.clip(np.stack(planes), 0.0, 1.0)


def read_picture(path: Path, channels: int) -> np.ndarray:
    """A PNG or JPEG file as (channels, h, w) in [0, 1]: 8-bit files divided by 255, 16-bit and float
    files scaled by their own range."""
    from PIL import Image, UnidentifiedImageError

    try:
        # an image claiming more pixels than Pillow's MAX_IMAGE_PIXELS (a decompression bomb) is a problem of
        # this file like any other: Pillow's warning and its error alike
        with (
            warnings.catch_warnings(action="error", category=Image.DecompressionBombWarning),
            Image.open(path) as img,
        ):
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                grey = np.asarray(img, dtype=np.float64)
                low, high = float(grey.min()), float(grey.max())
                grey = (grey - low) / (high - low) if high > low else np.zeros_like(grey)
                planes = np.repeat(grey[None], channels, axis=0)
            elif channels == 1:
                planes = np.asarray(img.convert("L"), dtype=np.float64)[None] / 255.0
            else:
                planes = np.moveaxis(np.asarray(img.convert("RGB"), dtype=np.float64), -1, 0) / 255.0
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageProblem(f"not a readable image ({type(exc).__name__})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageProblem("more pixels than Pillow reads safely (a decompression bomb)") from None
    return planes


def _label_rows(
    labels_csv: Path, folder: Path, problems: list[str], *, labels_in_files: bool = False
) -> list[tuple[str, str, int]]:
    """(patient id, file, label) of each valid row; a problem per invalid row (naming its file and line).
    With ``labels_in_files`` the CSV names patients and files only (the label is read from each file: -1
    here) and a ``label`` column is refused, so that a label never has two sources."""
    columns = _LABEL_COLUMNS[:2] if labels_in_files else _LABEL_COLUMNS
    try:
        with labels_csv.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = tuple(reader.fieldnames or ())
            missing = [c for c in columns if c not in header]
            if missing:
                raise SchemaError(
                    f"labels file {labels_csv.name}: missing column(s) {missing}; it needs {list(columns)}"
                )
            if labels_in_files and "label" in header:
                raise SchemaError(
                    f"labels file {labels_csv.name}: has a label column while the labels are read from "
                    "the files (label_tag); drop one of the two"
                )
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SchemaError(f"labels file {labels_csv.name} cannot be read ({type(exc).__name__})") from None
    if len(rows) > MAX_IMAGES:
        raise SchemaError(f"labels file {labels_csv.name}: more than {MAX_IMAGES} rows")
    out: list[tuple[str, str, int]] = []
    inside = folder.resolve()
    seen_ids: set[str] = set()
    seen_files: set[str] = set()
    for line, row in enumerate(rows, start=2):
        name = (row.get("file") or "").strip()
        pid = (row.get("patient_id") or "").strip()
        text = (row.get("label") or "").strip()
        where = f"{name or '<no file>'} (labels line {line})"
        if not name:
            problems.append(f"{where}: no file named")
            continue
        if Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"{where}: the file must be a path inside the folder")
            continue
        try:
            outside = not (folder / name).resolve().is_relative_to(inside)  # a symbolic link out of it
        except (OSError, RuntimeError):  # a loop of links
            outside = True
        if outside:
            problems.append(f"{where}: the file must be a path inside the folder (a link leads out of it)")
            continue
        if name in seen_files:
            problems.append(f"{where}: listed twice")
            continue
        seen_files.add(name)
        if labels_in_files:
            text = "-1"
        elif text not in ("0", "1"):
            problems.append(f"{where}: missing label (must be 0 or 1)")
            continue
        if not pid:
            problems.append(f"{where}: no patient id")
            continue
        if pid in seen_ids:
            problems.append(f"{where}: its patient id is on another row (one image per patient)")
            continue
        seen_ids.add(pid)
        if not (folder / name).is_file():
            problems.append(f"{where}: no such file in the folder")
            continue
        out.append((pid, name, int(text)))
    return out


def _candidates(folder: Path, labels_csv: Path, is_candidate: Callable[[Path], bool]) -> list[str]:
    found = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path == labels_csv or any(p.startswith(".") for p in path.parts[-1:]):
            continue
        if is_candidate(path):
            found.append(path.relative_to(folder).as_posix())
    return found


def read_image_folder(
    folder: Path,
    labels_csv: Path,
    *,
    size: int,
    channels: int,
    reader: Reader,
    is_candidate: Callable[[Path], bool],
    test_fraction: float,
    seed: int,
    name: str,
    labeler: Labeler | None = None,
) -> TabularDataset:
    """The dataset of a folder of images with a labels CSV (see the module docstring); SchemaError naming
    every file that cannot be used. With ``labeler`` each label is read from its file (the CSV then names
    patients and files only)."""
    if not folder.is_dir():
        raise SchemaError(f"image folder {folder.name!r} does not exist or is not a folder")
    if not labels_csv.is_file():
        raise SchemaError(f"labels file {labels_csv.name!r} does not exist")
    problems: list[str] = []
    rows = _label_rows(labels_csv, folder, problems, labels_in_files=labeler is not None)
    labelled = {f for _, f, _ in rows}
    listed_bad = {p.split(" (labels line", 1)[0] for p in problems}
    for rel in _candidates(folder, labels_csv, is_candidate):
        if rel not in labelled and rel not in listed_bad:
            problems.append(f"{rel}: missing label (no row in {labels_csv.name})")
    images: list[np.ndarray] = []
    labels: list[int] = []
    for _, rel, label in rows:
        try:
            if labeler is not None:
                label = labeler(folder / rel)
            image = reader(folder / rel, channels)
            if image.ndim != 3 or image.shape[0] != channels or min(image.shape[1:]) < 1:
                raise ImageProblem(f"unexpected pixel layout {image.shape}")
            images.append(resize(image, size).reshape(-1))
            labels.append(label)
        except ImageProblem as exc:
            problems.append(f"{rel}: {exc}")
    if problems:
        shown = "; ".join(problems[:_SHOWN_PROBLEMS])
        more = f"; and {len(problems) - _SHOWN_PROBLEMS} more" if len(problems) > _SHOWN_PROBLEMS else ""
        raise SchemaError(
            f"image folder {folder.name!r}: {len(problems)} file(s) cannot be used: {shown}{more}",
            hint="fix or remove the files named, or give each image a row (patient_id, file, label 0/1)",
        )
    if len(rows) < 2:
        raise SchemaError(f"image folder {folder.name!r}: fewer than 2 labelled images")
    X = np.stack(images)
    y = np.array(labels, dtype=np.int64)
    ids = [pid for pid, _, _ in rows]
    train, test = split_indices(y, test_size=test_fraction, random_state=seed)
    return TabularDataset(
        name=name,
        X_train=X[train],
        y_train=y[train],
        X_test=X[test],
        y_test=y[test],
        feature_names=tuple(f"px{i}" for i in range(X.shape[1])),
        patient_ids_train=tuple(ids[i] for i in train),
        patient_ids_test=tuple(ids[i] for i in test),
    )


IMAGE_PARAMS = frozenset({"labels", "size", "test_fraction", "seed"})


def _folder(uri: DatasetURI) -> tuple[Path, Path]:
    if uri.host not in ("", "localhost"):
        raise ConfigError(
            f"dataset URI {uri.raw!r}: the folder must be absolute, like {uri.scheme}:///data/images"
        )
    folder = Path(unquote(uri.path))
    if not folder.is_absolute():
        raise ConfigError(f"dataset URI {uri.raw!r}: the folder path must be absolute")
    text = uri.params.get("labels")
    labels = Path(text) if text is not None else folder / "labels.csv"
    if not labels.is_absolute():
        raise ConfigError(f"dataset URI {uri.raw!r}: labels={text!r} must be an absolute path")
    return folder, labels


def image_quality(dataset: TabularDataset) -> QualityReport:
    """The site's report of an image dataset: images, labels, and the range of all pixel values."""
    X = np.concatenate([dataset.X_train, dataset.X_test])
    y = np.concatenate([dataset.y_train, dataset.y_test])
    pixels = X.reshape(-1)
    column = _numeric(
        f"pixels of {X.shape[0]} images", "image", pixels, np.zeros(pixels.size, dtype=np.bool_)
    )
    return QualityReport(rows=int(X.shape[0]), positives=int(y.sum()), columns=(column,))


class ImageFolderConnector:
    """``images:///abs/folder?labels=/abs/labels.csv&size=28``: PNG and JPEG files."""

    def open(self, uri: DatasetURI, data_dir: Path) -> TabularDataset:
        del data_dir  # the URI carries an absolute path
        uri.check_params(IMAGE_PARAMS | {"channels"})
        folder, labels = _folder(uri)
        channels = uri.int_param("channels", 1, low=1, high=3)
        if channels == 2:
            raise ConfigError(f"dataset URI {uri.raw!r}: channels must be 1 (grey) or 3 (RGB)")
        return read_image_folder(
            folder,
            labels,
            size=uri.int_param("size", 28, low=8, high=512),
            channels=channels,
            reader=read_picture,
            is_candidate=lambda p: p.suffix.lower() in IMAGE_SUFFIXES,
            test_fraction=uri.float_param("test_fraction", 0.3, low=0.0, high_exclusive=1.0),
            seed=uri.int_param("seed", 0, low=0, high=2**32 - 1),
            name=folder.name,
        )

    quality = staticmethod(image_quality)
