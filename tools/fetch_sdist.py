"""Download one source distribution from the package index and check its sha256.

``pip download`` cannot be used for mmcv and pb1-detectron2: pip runs their ``setup.py`` to read
metadata before saving the file, and both ``setup.py`` files import torch / compile code.  This
helper reads the index's simple page (PEP 503), picks the ``.tar.gz`` of the pinned version and
refuses a file whose hash differs from the pinned one.

Usage: python tools/fetch_sdist.py NAME VERSION SHA256 DEST_DIR
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import urllib.request
from pathlib import Path

INDEX = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")


def fetch(name: str, version: str, sha256: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / f"{name}-{version}.tar.gz"
    if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == sha256:
        return target
    page = urllib.request.urlopen(f"{INDEX}/{name}/", timeout=120).read().decode()
    pattern = re.compile(r'href="([^"#]*/' + re.escape(target.name) + r')(?:#[^"]*)?"')
    match = pattern.search(page)
    if match is None:
        raise SystemExit(f"fetch_sdist: {target.name} is not listed on {INDEX}/{name}/")
    data = urllib.request.urlopen(match.group(1), timeout=600).read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise SystemExit(f"fetch_sdist: {target.name} has sha256 {digest}, expected {sha256}")
    tmp = target.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(target)
    return target


if __name__ == "__main__":
    if len(sys.argv) != 5:
        raise SystemExit(__doc__)
    print(fetch(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])))
