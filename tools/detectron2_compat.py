"""Make the detectron2 v0.6 release code install, python-only, on torch 2.14 / numpy 2 / Pillow 10+.

Detectron2 has no release on PyPI.  The sdist ``pb1-detectron2==0.6`` carries the Python code of
the official v0.6 tag file for file, but not ``detectron2/layers/csrc`` (the C++ ops), so its
``setup.py`` cannot build as shipped.  Each fix below is a plain text edit of the extracted sdist,
says which upstream change it mirrors, and fails loudly when the text it expects is not there
(so a different sdist is never patched half-way).

Usage: python tools/detectron2_compat.py SDIST_DIR
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

MISSING_C = '''try:
    from detectron2 import _C
except ImportError:  # mae-transfer compat: python-only install, no compiled ops

    class _MissingOps:
        def __getattr__(self, name):
            raise RuntimeError(
                f"detectron2 was installed without its C++ ops, so '_C.{name}' is unavailable "
                "(rotated boxes, deformable conv, fast COCO eval); build detectron2 from source "
                "to use it"
            )

    _C = _MissingOps()
'''


def _edit(path: Path, old: str, new: str, *, regex: bool = False, count_at_least: int = 1) -> None:
    text = path.read_text()
    if regex:
        text, n = re.subn(old, new, text)
    else:
        n = text.count(old)
        text = text.replace(old, new)
    if n < count_at_least:
        raise SystemExit(f"detectron2_compat: expected {old!r} in {path}, found it {n} times")
    path.write_text(text)


def fix_setup_py(root: Path) -> None:
    """Install as the distribution ``detectron2`` with no extension module, configs included.

    ``ext_modules=[]``: the C++ sources are not in the sdist (upstream builds them from the repo).
    The distribution is named ``detectron2`` (not ``pb1-detectron2``) so that it is the ordinary
    package users and ``pip`` expect.  The model-zoo configs live in ``detectron2/model_zoo/configs``
    in the sdist, where upstream's ``get_model_zoo_configs()`` (which looks in ``./configs``) does
    not find them; list them from there instead.
    """
    setup = root / "setup.py"
    _edit(setup, 'name="pb1-detectron2"', 'name="detectron2"')
    _edit(setup, "ext_modules=get_extensions()", "ext_modules=[]")
    _edit(
        setup,
        'package_data={"detectron2.model_zoo": get_model_zoo_configs()}',
        'package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]}',
    )
    # the sdist's own metadata folder would be read as a second, stale distribution
    for stale in root.glob("*.egg-info"):
        for f in sorted(stale.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        stale.rmdir()


def fix_optional_c_ops(root: Path) -> None:
    """Tolerate a missing ``detectron2._C`` at import time.

    Mirrors upstream after v0.6, where the modules that need the compiled ops import them lazily
    or behind ``try``, so that ``import detectron2.layers`` / ``detectron2.evaluation`` works
    without them.  Calling an op that needs them raises a clear RuntimeError instead.
    """
    for rel in (
        "detectron2/layers/deform_conv.py",
        "detectron2/layers/rotated_boxes.py",
        "detectron2/layers/roi_align_rotated.py",
        "detectron2/evaluation/fast_eval_api.py",
    ):
        _edit(root / rel, "from detectron2 import _C\n", MISSING_C)


def fix_numpy_aliases(root: Path) -> None:
    """``np.bool`` / ``np.int`` / ``np.float`` / ``np.str`` were removed in numpy 1.24.

    Mirrors upstream's "remove deprecated numpy aliases" change: use the builtins.
    """
    pattern = r"\bnp\.(bool|int|float|str)\b(?![_\d])"
    hits = 0
    for path in (root / "detectron2").rglob("*.py"):
        text = path.read_text()
        new, n = re.subn(pattern, r"\1", text)
        if n:
            path.write_text(new)
            hits += n
    if hits == 0:
        raise SystemExit("detectron2_compat: no numpy aliases found; is this the v0.6 sdist?")


def fix_pillow_linear(root: Path) -> None:
    """``Image.LINEAR`` was removed in Pillow 10; upstream switched to ``Image.BILINEAR``."""
    _edit(root / "detectron2/data/transforms/transform.py", "Image.LINEAR", "Image.BILINEAR")


FIXES = (fix_setup_py, fix_optional_c_ops, fix_numpy_aliases, fix_pillow_linear)


def main(root: Path) -> None:
    marker = root / ".mae-transfer-compat"
    if marker.exists():
        print(f"detectron2_compat: {root} already patched")
        return
    for fix in FIXES:
        fix(root)
        print(f"detectron2_compat: {fix.__name__}: {fix.__doc__.strip().splitlines()[0]}")
    marker.write_text("\n".join(f.__name__ for f in FIXES) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
