"""Writers of image test files: DICOM files built with pydicom, PNG/JPEG with Pillow, and labels CSVs."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from fedhealth.data import TabularDataset


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    bits: int = 16,
    signed: bool = False,
    with_pixels: bool = True,
    attributes: dict[str, str] | None = None,
) -> Path:
    """A single-frame grey DICOM file (Secondary Capture) of the integer ``pixels``."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.PatientID = "ANON"
    for keyword, value in (attributes or {}).items():
        setattr(ds, keyword, value)
    if with_pixels:
        rows, cols = pixels.shape
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 16 if bits > 8 else 8
        ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = 1 if signed else 0
        dtype = (np.int16 if signed else np.uint16) if bits > 8 else np.uint8
        ds.PixelData = np.ascontiguousarray(pixels, dtype=dtype).tobytes()
        if slope is not None:
            ds.RescaleSlope = slope
            ds.RescaleIntercept = intercept or 0.0
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window
    ds.save_as(path, enforce_file_format=True)
    return path


def write_labels(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", "file", "label"])
        writer.writerows(rows)
    return path


def dicom_square_folder(folder: Path, n: int, side: int = 16, seed: int = 0) -> Path:
    """``n`` 12-bit DICOM images (rescaled, half of them MONOCHROME1) whose label 1 carries a bright square;
    with their labels.csv. Returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % 2
        img = rng.integers(0, 1200, size=(side, side))
        q = max(side // 3, 2)
        if label:
            img[1 : 1 + q, 1 : 1 + q] = 4000
        mono1 = i % 4 >= 2
        stored = 4095 - img if mono1 else img  # shown the same way once MONOCHROME1 is inverted
        write_dicom(
            folder / f"img{i:03d}.dcm",
            stored,
            photometric="MONOCHROME1" if mono1 else "MONOCHROME2",
            slope=2.0,
            intercept=-1000.0,
            bits=12,
        )
        rows.append((f"patient-{i}", f"img{i:03d}.dcm", str(label)))
    write_labels(folder / "labels.csv", rows)
    return folder


def square_images(n: int, side: int = 16, seed: int = 0, name: str = "squares") -> TabularDataset:
    """``n`` noisy grey images of ``side`` x ``side``; label 1 images carry a bright square in the upper left
    corner. Rows are the flattened images in [0, 1] (as the image connectors give them)."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(np.int64)
    images = rng.random((n, side, side)) * 0.3
    q = max(side // 3, 2)
    images[labels == 1, 1 : 1 + q, 1 : 1 + q] += 0.7
    X = images.reshape(n, side * side)
    cut = n - max(n // 4, 2)
    return TabularDataset(
        name=name,
        X_train=X[:cut],
        y_train=labels[:cut],
        X_test=X[cut:],
        y_test=labels[cut:],
        feature_names=tuple(f"px{i}" for i in range(side * side)),
        patient_ids_train=tuple(f"p{i}" for i in range(cut)),
        patient_ids_test=tuple(f"p{i}" for i in range(cut, n)),
    )
