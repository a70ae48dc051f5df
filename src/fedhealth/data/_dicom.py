"""DICOM images (``dicom:///abs/folder?labels=/abs/labels.csv&size=28``), read with pydicom.

``fedhealth site dataset check`` also reports each identifying attribute (:data:`IDENTIFYING_ATTRIBUTES`:
names, ids, dates, places, clinicians) that the files carry with a value, naming the attribute and a file,
never the value; ``allow_tags=PatientID,...`` lets a site keep some it has pseudonymised.

Each file's stored values become grey levels in [0, 1] as a viewer shows them:

1. the modality LUT: ``value * RescaleSlope + RescaleIntercept`` (e.g. Hounsfield units for CT), on the
   stored integers of any bit depth (8, 12, 16 bits, signed or not);
2. the VOI window: ``window=CENTER:WIDTH`` in the URI, else the file's first ``WindowCenter`` /
   ``WindowWidth``, else the image's own range; values below the window are 0, above it 1, linear between;
3. ``MONOCHROME1`` (where the lowest value is shown white) is inverted, so that bright means the same in
   every file; colour images (``SamplesPerPixel`` 3) are averaged to grey.

A file that is not DICOM, is corrupt, holds no pixel data (a structured report, a presentation state) or
holds several frames is a problem named by its file (see :mod:`fedhealth.data._images`).

Labels come from the labels CSV (``patient_id``, ``file``, ``label``), or from a tag of each file:
``label_tag=ImageComments`` (a keyword of pydicom's dictionary) or ``label_tag=(0020,4000)`` (group,
element in hex; the parentheses and comma are optional), with ``label_map=benign:0,malignant:1`` mapping the
tag's values (stripped, compared exactly) to the classes 0 and 1; without ``label_map`` the value must be
``0`` or ``1``. The CSV then names ``patient_id`` and ``file`` only (a ``label`` column is refused: one
source per label). A file without the tag, with it empty, or with a value the map does not name is a problem
named by its file like any other: the value itself is never shown (a comment may hold a name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedhealth.core import ConfigError
from fedhealth.data._connector import DatasetURI
from fedhealth.data._dataset import TabularDataset
from fedhealth.data._images import (
    IMAGE_PARAMS,
    ImageProblem,
    _folder,
    _label_rows,
    image_quality,
    read_image_folder,
)
from fedhealth.data._quality import QualityReport

_IGNORED_SUFFIXES = frozenset({".csv", ".txt", ".json", ".md", ".toml"})

# Attributes that identify a patient, a clinician, a place or an examination (after DICOM PS3.15's Basic
# Application Level Confidentiality Profile). ``site dataset check`` reports each one a file carries with a
# non-empty value, unless the site allows it (``allow_tags=PatientID,StudyDate``): their values never leave
# the site, but a folder meant to be de-identified should not hold them.
IDENTIFYING_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientMotherBirthName",
    "MedicalRecordLocator",
    "IssuerOfPatientID",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "OperatorsName",
    "RequestingPhysician",
    "StationName",
    "DeviceSerialNumber",
)


def _first(value: object) -> float:
    """A DICOM numeric value, or the first of a multi-valued one."""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = next(iter(value))  # type: ignore[call-overload]
    return float(value)  # type: ignore[arg-type]


def _check_pixel_count(ds: Any) -> None:
    """Refuse, before decoding, an image declaring more pixels than Pillow reads for a PNG or JPEG file
    (``PIL.Image.MAX_IMAGE_PIXELS``, read at each call): an RLE-compressed file of a few MiB could otherwise
    be decoded into gigabytes, and then copied as 64-bit floats."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    try:
        pixels = (
            int(ds.get("Rows", 0) or 0)
            * int(ds.get("Columns", 0) or 0)
            * int(ds.get("SamplesPerPixel", 1) or 1)
            * int(ds.get("NumberOfFrames", 1) or 1)
        )
    except (TypeError, ValueError):
        raise ImageProblem("its rows, columns, samples or frames are not numbers") from None
    if limit is not None and pixels > limit:
        raise ImageProblem("more pixels than are read safely (a decompression bomb)")


# Deflated Explicit VR Little Endian: pydicom inflates the whole file with no bound before reading a tag
_DEFLATED = "1.2.840.10008.1.2.1.99"


def _dcmread(path: Path, *, stop_before_pixels: bool = False) -> Any:
    """``pydicom.dcmread``, after refusing a deflated file from its file meta (read uninflated): a few MiB
    deflated could inflate into gigabytes before any check here sees a tag."""
    import pydicom
    from pydicom.filereader import read_file_meta_info

    try:
        meta = read_file_meta_info(path)
    except Exception:  # no or damaged file meta: dcmread below says what is wrong with the file
        meta = None
    if meta is not None and str(meta.get("TransferSyntaxUID", "")) == _DEFLATED:
        raise ImageProblem(
            "a deflated DICOM file (it would be inflated whole before any check); store it in an "
            "uncompressed or image-compressed transfer syntax"
        )
    return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)


def dicom_grey(path: Path, window: tuple[float, float] | None = None) -> np.ndarray:
    """The (1, rows, columns) grey image in [0, 1] of one DICOM file (see the module docstring)."""
    from pydicom.errors import InvalidDicomError

    try:
        ds = _dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise ImageProblem(f"not a readable DICOM file ({type(exc).__name__})") from None
    if "PixelData" not in ds:
        raise ImageProblem("a DICOM file without pixel data (not an image)")
    _check_pixel_count(ds)
    try:
        stored = np.asarray(ds.pixel_array, dtype=np.float64)
    except Exception as exc:  # pydicom's decoders raise many kinds on damaged or unsupported pixel data
        raise ImageProblem(f"its pixel data cannot be decoded ({type(exc).__name__})") from None
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageProblem(f"a multi-frame image ({frames} frames); one frame per file is read")
    if samples == 3 and stored.ndim == 3:
        stored = stored.mean(axis=-1)
    if stored.ndim != 2:
        raise ImageProblem(f"an image of {stored.ndim} dimensions; a 2D image is read")
    try:
        slope = _first(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = _first(ds.get("RescaleIntercept", 0.0) or 0.0)
    except (TypeError, ValueError):
        raise ImageProblem("its rescale slope or intercept is not a number") from None
    with np.errstate(over="ignore", invalid="ignore"):
        values = stored * slope + intercept
    # a NaN or infinite slope, or one that overflows, would otherwise leave min == max: a black image
    if not np.isfinite(values).all():
        raise ImageProblem("its rescaled pixel values are not finite (rescale slope or intercept)")
    if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            window = (_first(ds.WindowCenter), _first(ds.WindowWidth))
        except (TypeError, ValueError):
            raise ImageProblem("its window center or width is not a number") from None
        # a NaN center would leave the window empty (an all-black image), an infinite width a NaN image
        if not (np.isfinite(window[0]) and np.isfinite(window[1])):
            raise ImageProblem("its window center or width is not finite")
    if window is not None and window[1] > 0:
        low, high = window[0] - window[1] / 2, window[0] + window[1] / 2
    else:
        low, high = float(values.min()), float(values.max())
    grey = np.clip((values - low) / (high - low), 0.0, 1.0) if high > low else np.zeros_like(values)
    if not np.isfinite(grey).all():
        raise ImageProblem("its pixel values are not finite")
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        grey = 1.0 - grey
    return grey[None]


def _window(uri: DatasetURI) -> tuple[float, float] | None:
    text = uri.params.get("window")
    if text is None:
        return None
    try:
        center, width = (float(part) for part in text.split(":"))
    except ValueError:
        raise ConfigError(f"dataset URI {uri.raw!r}: window={text!r} must be CENTER:WIDTH") from None
    if not (np.isfinite(center) and np.isfinite(width) and width > 0):
        raise ConfigError(f"dataset URI {uri.raw!r}: window width must be positive and both finite")
    return center, width


_NUMERIC_TAG = re.compile(r"^\(?\s*([0-9A-Fa-f]{4})\s*,?\s*([0-9A-Fa-f]{4})\s*\)?$")


@dataclass(frozen=True, slots=True)
class LabelTag:
    """Where each file's label is read: the tag (as an int), how the URI named it, and the value -> class
    map (None: the value itself is 0 or 1)."""

    tag: int
    shown: str
    classes: dict[str, int] | None

    def label(self, path: Path) -> int:
        """The file's class; :class:`ImageProblem` naming the tag, never its value."""
        from pydicom.errors import InvalidDicomError

        try:
            ds = _dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
            raise ImageProblem(f"not a readable DICOM file ({type(exc).__name__})") from None
        element = ds.get(self.tag)
        value = element.value if element is not None else None
        if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
            value = "\\".join(str(v) for v in value)
        text = "" if value is None else str(value).strip()
        if not text:
            raise ImageProblem(f"no label: the label tag {self.shown} is missing or empty")
        classes = self.classes if self.classes is not None else {"0": 0, "1": 1}
        if text not in classes:
            what = "label_map" if self.classes is not None else "0 or 1 (no label_map given)"
            raise ImageProblem(f"no label: the label tag {self.shown} holds a value not in {what}")
        return classes[text]


def label_tag(uri: DatasetURI) -> LabelTag | None:
    """The URI's ``label_tag`` and ``label_map`` (None without ``label_tag``); ConfigError if malformed."""
    text = uri.params.get("label_tag")
    mapping = uri.params.get("label_map")
    if text is None:
        if mapping is not None:
            raise ConfigError(f"dataset URI {uri.raw!r}: label_map needs label_tag (the tag it maps)")
        return None
    from pydicom.datadict import tag_for_keyword

    text = text.strip()
    numeric = _NUMERIC_TAG.match(text)
    if numeric:
        tag = int(numeric.group(1), 16) << 16 | int(numeric.group(2), 16)
        shown = f"({numeric.group(1).upper()},{numeric.group(2).upper()})"
    else:
        found = tag_for_keyword(text)
        if found is None:
            raise ConfigError(
                f"dataset URI {uri.raw!r}: label_tag={text!r} is neither a DICOM keyword (e.g. "
                "ImageComments) nor a tag (gggg,eeee)"
            )
        tag, shown = int(found), text
    classes = None
    if mapping is not None:
        classes = {}
        for part in mapping.split(","):
            value, sep, cls = part.rpartition(":")
            value = value.strip()
            if not sep or not value or cls.strip() not in ("0", "1"):
                raise ConfigError(
                    f"dataset URI {uri.raw!r}: label_map must be VALUE:CLASS pairs separated by commas, "
                    "each class 0 or 1 (e.g. label_map=benign:0,malignant:1)"
                )
            if value in classes:
                raise ConfigError(f"dataset URI {uri.raw!r}: label_map names one value twice")
            classes[value] = int(cls)
    return LabelTag(tag=tag, shown=shown, classes=classes)


def _is_dicom_candidate(path: Path) -> bool:
    return path.suffix.lower() not in _IGNORED_SUFFIXES and path.name.upper() != "DICOMDIR"


def identifying_attributes(
    folder: Path, files: list[str], allowed: frozenset[str] = frozenset()
) -> dict[str, list[str]]:
    """For each identifying attribute (not ``allowed``) the files (relative to ``folder``) where it holds a
    non-empty value; headers only are read."""

    found: dict[str, list[str]] = {}
    for rel in files:
        ds = _dcmread(folder / rel, stop_before_pixels=True)
        for keyword in IDENTIFYING_ATTRIBUTES:
            if keyword not in allowed and str(ds.get(keyword, "") or "").strip():
                found.setdefault(keyword, []).append(rel)
    return found


def _allowed(uri: DatasetURI) -> frozenset[str]:
    text = uri.params.get("allow_tags", "")
    names = frozenset(t.strip() for t in text.split(",") if t.strip())
    unknown = sorted(names - set(IDENTIFYING_ATTRIBUTES))
    if unknown:
        raise ConfigError(
            f"dataset URI {uri.raw!r}: allow_tags names {unknown}, not among the identifying attributes "
            f"{list(IDENTIFYING_ATTRIBUTES)}"
        )
    return names


class DicomConnector:
    """``dicom:///abs/folder?labels=/abs/labels.csv&size=28[&window=CENTER:WIDTH][&label_tag=...]``: one
    grey channel."""

    def open(self, uri: DatasetURI, data_dir: Path) -> TabularDataset:
        del data_dir  # the URI carries an absolute path
        uri.check_params(IMAGE_PARAMS | {"window", "allow_tags", "label_tag", "label_map"})
        _allowed(uri)
        folder, labels = _folder(uri)
        window = _window(uri)
        tag = label_tag(uri)

        def reader(path: Path, channels: int) -> np.ndarray:
            del channels  # DICOM images are read as one grey channel
            return dicom_grey(path, window)

        return read_image_folder(
            folder,
            labels,
            size=uri.int_param("size", 28, low=8, high=512),
            channels=1,
            reader=reader,
            is_candidate=_is_dicom_candidate,
            test_fraction=uri.float_param("test_fraction", 0.3, low=0.0, high_exclusive=1.0),
            seed=uri.int_param("seed", 0, low=0, high=2**32 - 1),
            name=folder.name,
            labeler=tag.label if tag is not None else None,
        )

    def inspect(self, uri: DatasetURI, data_dir: Path) -> tuple[TabularDataset, QualityReport]:
        """The dataset and its site-only report, which names the identifying attributes the files carry."""
        dataset = self.open(uri, data_dir)
        folder, labels = _folder(uri)
        in_files = label_tag(uri) is not None
        files = [rel for _, rel, _ in _label_rows(labels, folder, [], labels_in_files=in_files)]
        found = identifying_attributes(folder, files, _allowed(uri))
        warnings = tuple(
            f"identifying DICOM attribute {keyword} in {len(where)} file(s) (e.g. {where[0]}); "
            "de-identify the files, or allow it with allow_tags="
            for keyword, where in sorted(found.items())
        )
        report = image_quality(dataset)
        return dataset, QualityReport(
            rows=report.rows, positives=report.positives, columns=report.columns, warnings=warnings
        )
