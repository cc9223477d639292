"""Shared fixtures: real servers (S3 via moto) and a slice of the shared CIFAR-10 data.

Fixtures only start what a test asks for; servers bind 127.0.0.1 on random ports and stop at the end.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import servers

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR_TAR = REPO_ROOT.parent / "shared/data/cifar10/train.tar"


# --- S3 (moto server) ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL of a real S3 API (moto's server) on 127.0.0.1, for the whole session."""
    with servers.moto_s3_server() as url:
        yield url


@pytest.fixture
def s3_storage_options(s3_server: str) -> dict[str, str]:
    """Storage options (endpoint + credentials) for `s3_server`, as a job spec would carry them."""
    return servers.s3_storage_options(s3_server)


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh empty bucket on `s3_server`, as `s3://name`."""
    return servers.make_bucket(s3_server)


# --- CIFAR-10 slice ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CifarSlice:
    """A few images per class from the shared CIFAR-10 tar, as a folder and as a tar of the same layout."""

    root: Path  # root/train/<class>/NNNN.jpg
    folder: Path  # root/train
    tar: Path  # tar with train/<class>/NNNN.jpg
    classes: tuple[str, ...]
    per_class: int

    @property
    def count(self) -> int:
        return len(self.classes) * self.per_class


CIFAR_SLICE_PER_CLASS = 30


@pytest.fixture(scope="session")
def cifar_slice(tmp_path_factory: pytest.TempPathFactory) -> CifarSlice:
    """300 CIFAR-10 JPEGs (30 per class) extracted from ../shared/data/cifar10/train.tar."""
    if not CIFAR_TAR.is_file():
        pytest.fail(f"shared CIFAR-10 data missing: {CIFAR_TAR} (expected beside the repo, see the brief)")
    root = tmp_path_factory.mktemp("cifar_slice")
    wanted = {f"{i:04d}.jpg" for i in range(CIFAR_SLICE_PER_CLASS)}
    classes: set[str] = set()
    small_tar = root / "train.tar"
    with tarfile.open(CIFAR_TAR, "r:") as src, tarfile.open(small_tar, "w") as dst:
        for m in src:
            parts = m.name.split("/")
            if not (m.isreg() and len(parts) == 3 and parts[0] == "train" and parts[2] in wanted):
                continue
            data = src.extractfile(m)
            assert data is not None
            payload = data.read()
            out = root / m.name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(payload)
            classes.add(parts[1])
            info = tarfile.TarInfo(m.name)
            info.size = len(payload)
            dst.addfile(info, io.BytesIO(payload))
    if len(classes) != 10:
        pytest.fail(f"{CIFAR_TAR}: expected 10 class folders under train/, found {sorted(classes)}")
    return CifarSlice(root, root / "train", small_tar, tuple(sorted(classes)), CIFAR_SLICE_PER_CLASS)
