"""Immutable version directories, written atomically.

Model versions (``model/checkpoint.py``) and two-tower versions
(``model/inttower.py``) are written the same way: into a temporary directory
beside the target, renamed into place only when every file is there, removed
if anything fails. A reader never sees half a version.

>>> import tempfile
>>> root = Path(tempfile.mkdtemp())
>>> with new_version_dir(root / "v1") as tmp:
...     _ = (tmp / "config.json").write_text("{}")
>>> sorted(p.name for p in root.iterdir()), (root / "v1" / "config.json").exists()
(['v1'], True)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["new_version_dir", "utc_stamp"]


def utc_stamp() -> str:
    """The current UTC time as ``YYYY-MM-DDTHH:MM:SSZ`` (the ``created`` field)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@contextlib.contextmanager
def new_version_dir(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``directory`` when the block succeeds.

    ``directory`` must not exist (versions are immutable). On any exception the
    temporary directory is removed and the exception propagates.
    """
    target = Path(directory)
    if target.exists():
        raise FileExistsError(f"{target} exists: versions are immutable, pick a new name")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
