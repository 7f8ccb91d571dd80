"""The model registry: immutable version directories and a champion pointer.

Layout under ``root`` (a local directory or any fsspec URL, e.g. ``s3://bucket/models``)::

    versions/<name>/   one checkpoint per version (model/checkpoint.py), never changed
    CURRENT            the champion's version name, one line

The retrainer publishes a challenger as a new version and, if it wins,
:meth:`ModelRegistry.promote` rewrites ``CURRENT``; servers watch the pointer
and load the version it names beside the one they serve. Publishing copies
the directory under a temporary name and renames it (local) or uploads it
before the pointer can name it (object stores: the pointer is written last,
in one PUT), so a reader never finds half a version.

>>> import tempfile, pathlib
>>> reg = ModelRegistry(tempfile.mkdtemp())
>>> reg.current() is None, reg.versions()
(True, [])
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from model.checkpoint import CONFIG_FILE, Checkpoint, load_checkpoint

__all__ = ["ModelRegistry", "RegistryError"]

logger = logging.getLogger(__name__)

POINTER = "CURRENT"
VERSIONS = "versions"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RegistryError(ValueError):
    """A registry operation that cannot be done (unknown version, bad name, ...)."""


def new_version_name(now: float | None = None) -> str:
    """A sortable, unique name: UTC time to the second + 4 random hex digits.

    >>> new_version_name(0.0)[:17]
    '19700101T000000Z-'
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    return f"{stamp}-{secrets.token_hex(2)}"


class ModelRegistry:
    """Versions and the champion pointer under ``root``; see the module docstring.

    Args:
        root: local path or fsspec URL.
        cache_dir: where remote versions are downloaded before loading
            (default: a temporary directory per registry object).
    """

    def __init__(self, root: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None):
        self.root = str(root)
        self.fs, self._path = fsspec.core.url_to_fs(self.root)
        self._local = isinstance(self.fs, LocalFileSystem)
        self._cache = Path(cache_dir) if cache_dir else None

    def __repr__(self) -> str:
        return f"ModelRegistry({self.root!r})"

    def _join(self, *parts: str) -> str:
        return "/".join([self._path.rstrip("/"), *parts])

    # -- reading -----------------------------------------------------------------------

    def versions(self) -> list[str]:
        """Published version names, oldest first (names sort by time)."""
        base = self._join(VERSIONS)
        if not self.fs.exists(base):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False)]
        return sorted(n for n in names if _NAME.match(n) and self.fs.exists(
            self._join(VERSIONS, n, CONFIG_FILE)))

    def current(self) -> str | None:
        """The champion's version name, or ``None`` before the first promotion."""
        path = self._join(POINTER)
        try:
            text = self.fs.cat_file(path).decode("utf-8").strip()
        except FileNotFoundError:
            return None
        return text or None

    def has(self, name: str) -> bool:
        return _NAME.match(name) is not None and self.fs.exists(
            self._join(VERSIONS, name, CONFIG_FILE))

    def local_path(self, name: str) -> Path:
        """A local directory holding version ``name`` (downloaded once for remote roots)."""
        self._check_known(name)
        if self._local:
            return Path(self._join(VERSIONS, name))
        if self._cache is None:
            self._cache = Path(tempfile.mkdtemp(prefix="streamrec-models-"))
        target = self._cache / name
        if not (target / CONFIG_FILE).exists():
            self._cache.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self._cache))
            self.fs.get(self._join(VERSIONS, name) + "/", str(tmp) + "/", recursive=True)
            os.replace(tmp, target)
        return target

    def load(self, name: str, device: torch.device | str = "cpu") -> Checkpoint:
        """Load version ``name`` (eval mode)."""
        return load_checkpoint(self.local_path(name), device=device)

    # -- writing -----------------------------------------------------------------------

    def publish(self, checkpoint_dir: str | os.PathLike[str], name: str | None = None) -> str:
        """Copy a saved checkpoint directory in as a new version; returns its name.

        The version is not the champion until :meth:`promote` names it.
        """
        src = Path(checkpoint_dir)
        if not (src / CONFIG_FILE).is_file():
            raise RegistryError(f"{src} is not a saved model version (no {CONFIG_FILE})")
        name = name or new_version_name()
        if not _NAME.match(name):
            raise RegistryError(f"version name {name!r}: use letters, digits, '.', '_', '-'")
        if self.fs.exists(self._join(VERSIONS, name)):
            raise RegistryError(f"version {name!r} exists: versions are immutable")
        if self._local:
            base = Path(self._join(VERSIONS))
            base.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=base))
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            os.replace(tmp, base / name)
        else:
            # Config last: versions() lists a version only once its config.json is there.
            dest = self._join(VERSIONS, name)
            for f in sorted(src.rglob("*"), key=lambda p: p.name == CONFIG_FILE):
                if f.is_file():
                    self.fs.put_file(str(f), f"{dest}/{f.relative_to(src).as_posix()}")
        logger.info("published model version %s to %s", name, self.root)
        return name

    def promote(self, name: str) -> None:
        """Make ``name`` the champion (one atomic pointer write)."""
        self._check_known(name)
        data = (name + "\n").encode()
        if self._local:
            Path(self._path).mkdir(parents=True, exist_ok=True)
            tmp = Path(self._join(f".{POINTER}.{secrets.token_hex(4)}"))
            tmp.write_bytes(data)
            os.replace(tmp, self._join(POINTER))
        else:
            self.fs.pipe_file(self._join(POINTER), data)
        logger.info("promoted model version %s in %s", name, self.root)

    def _check_known(self, name: str) -> None:
        if not self.has(name):
            known = self.versions()
            raise RegistryError(f"no version {name!r} in {self.root}; known: {known[-5:]}")
