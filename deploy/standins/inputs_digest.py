"""The digest of everything `deploy/check` tests besides the code: the Dockerfile and what it copies in that
pins versions, the compose stack and the stand-ins. deploy/check prints it; deploy/README.md records the one
of the last passing run, and tests/deploy fails when the files have changed since (run deploy/check again)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INPUTS = ("Dockerfile", ".dockerignore", "constraints.txt", "pyproject.toml", "deploy/compose.yaml", "deploy/check")


def inputs_digest(repo: Path = REPO) -> str:
    files = [repo / p for p in INPUTS] + sorted((repo / "deploy" / "standins").rglob("*"))
    h = hashlib.sha256()
    for f in files:
        if f.is_file() and "__pycache__" not in f.parts:
            h.update(f.relative_to(repo).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


if __name__ == "__main__":
    sys.stdout.write(inputs_digest() + "\n")
