"""Lay out the wheels in ROOT/dl as a PEP 503 simple index under ROOT/simple (for TORCH_INDEX_URL)."""

import html
import re
import sys
from pathlib import Path

root = Path(sys.argv[1])
simple = root / "simple"
for wheel in sorted((root / "dl").glob("*.whl")):
    project = simple / re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    project.mkdir(parents=True, exist_ok=True)
    (project / wheel.name).unlink(missing_ok=True)
    (project / wheel.name).hardlink_to(wheel)


def page(links: list[str]) -> str:
    body = "".join(f'<a href="{html.escape(link)}">{html.escape(link)}</a>\n' for link in links)
    return f"<!DOCTYPE html>\n<html><body>\n{body}</body></html>\n"


projects = sorted(p for p in simple.iterdir() if p.is_dir())
for project in projects:
    (project / "index.html").write_text(page(sorted(w.name for w in project.glob("*.whl"))))
(simple / "index.html").write_text(page([p.name + "/" for p in projects]))
