"""An attacker's audit of the image connectors (docs/imaging.md, "Image connectors"): a labels CSV that
names a file outside the folder, and files built to break the reader. Every file is checked before any is
used, and an unusable one is a problem named in the check's one line (a SchemaError: ``dataset_invalid``
at a task).

Tests marked ``xfail(strict=True, reason="DEFECT: ...")`` show a guarantee that does not hold today; they
flip to failures (XPASS) once it is fixed.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from imaging_files import dicom_square_folder, write_labels
from PIL import Image

from fedhealth.data import SchemaError, open_dataset


def uri(scheme: str, folder: Path) -> str:
    return f"{scheme}://{quote(str(folder))}?size=8"


def png_folder(folder: Path, n: int = 6) -> list[tuple[str, str, str]]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray((rng.random((10, 10)) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
        rows.append((f"patient-{i}", f"img{i}.png", str(i % 2)))
    return rows


def outside_image(tmp_path: Path) -> Path:
    """An image beside the dataset's folder (another study's, another patient's), all white."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    Image.fromarray(np.full((10, 10), 255, dtype=np.uint8)).save(other / "secret.png")
    return other / "secret.png"


def test_a_folder_of_images_opens(tmp_path):
    """The control of the tests below."""
    folder = tmp_path / "xray"
    rows = png_folder(folder)
    write_labels(folder / "labels.csv", rows)
    dataset = open_dataset(uri("images", folder))
    assert dataset.num_train + dataset.num_test == 6


@pytest.mark.parametrize("scheme", ["images", "dicom"])
@pytest.mark.parametrize("escape", ["relative", "absolute", "nested-relative"])
def test_a_labels_row_naming_a_file_outside_the_folder_is_refused(tmp_path, scheme, escape):
    secret = outside_image(tmp_path)
    folder = tmp_path / "data"
    if scheme == "images":
        rows = png_folder(folder)
    else:
        dicom_square_folder(folder, 6)
        rows = [(f"patient-{i}", f"img{i:03d}.dcm", str(i % 2)) for i in range(6)]
    name = {
        "relative": "../elsewhere/secret.png",
        "absolute": str(secret),
        "nested-relative": "sub/../../elsewhere/secret.png",
    }[escape]
    write_labels(folder / "labels.csv", [*rows, ("patient-9", name, "1")])
    with pytest.raises(SchemaError, match="must be a path inside the folder") as caught:
        open_dataset(uri(scheme, folder))
    assert "patient-9" not in str(caught.value)


def test_a_symbolic_link_out_of_the_folder_is_refused(tmp_path):
    secret = outside_image(tmp_path)
    folder = tmp_path / "data"
    rows = png_folder(folder)
    os.symlink(secret, folder / "link.png")
    write_labels(folder / "labels.csv", [*rows, ("patient-9", "link.png", "1")])
    with pytest.raises(SchemaError, match=r"link\.png"):
        open_dataset(uri("images", folder))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's size), with a tiny
    image data chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_a_decompression_bomb_is_a_problem_named_by_its_file(tmp_path):
    folder = tmp_path / "xray"
    rows = png_folder(folder)
    (folder / "bomb.png").write_bytes(_png_header_only(30_000, 30_000))
    write_labels(folder / "labels.csv", [*rows, ("patient-9", "bomb.png", "1")])
    with pytest.raises(SchemaError, match=r"bomb\.png"):
        open_dataset(uri("images", folder))


def test_a_dicom_file_whose_header_lies_about_its_size_is_a_problem_named_by_its_file(tmp_path):
    import pydicom

    folder = dicom_square_folder(tmp_path / "ct", 6)
    liar = folder / "img002.dcm"
    ds = pydicom.dcmread(liar)
    ds.Rows, ds.Columns = 60_000, 60_000  # the pixel data stays 16 x 16
    ds.save_as(liar)
    with pytest.raises(SchemaError, match=r"img002\.dcm"):
        open_dataset(uri("dicom", folder))
