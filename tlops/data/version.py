"""The data version: DVC's hash of data/raw, remembered for the run that computed it."""

from __future__ import annotations

import os
from pathlib import Path

from tlops.core import paths
from tlops.core.errors import DataError

DATA_VERSION_ENV = "TLOPS_DATA_VERSION"  # "<version> <absolute data/raw>": this run's data version, once known


def data_version(root: Path = Path("."), folder: Path = paths.RAW) -> str:
    """THE data version: DVC's hash of data/raw, the `md5` ("<hex>.dir") that dvc.lock records for it.

    Hashed from the workspace through DVC's state cache, so a repeat call only stats the files. A run needs it
    once: stages ask current_data_version(), which hashes only when nobody in this run has yet.
    """
    from dvc_data.hashfile.build import build

    raw = Path(root).resolve() / folder
    if not raw.is_dir():
        stage = "ingest_target" if Path(folder) == paths.TARGET else "ingest"
        raise DataError(f"{raw} does not exist; run the {stage} stage first (dvc repro {stage})")
    repo = _open_dvc_repo(Path(root))
    if repo is None:  # not a DVC repo: same hash, no state cache
        from dvc_data.hashfile.db import HashFileDB
        from dvc_objects.fs.local import LocalFileSystem
        from dvc_objects.fs.memory import MemoryFileSystem

        _, _, obj = build(HashFileDB(MemoryFileSystem(), "/staging"), str(raw), LocalFileSystem(), "md5",
                          dry_run=True)
        return obj.hash_info.value
    with repo:
        _, _, obj = build(repo.cache.local, str(raw), repo.fs, "md5", ignore=repo.dvcignore, dry_run=True)
    return obj.hash_info.value


def current_data_version(root: Path = Path(".")) -> str:
    """This run's data version: the one already known (see remember_data_version), else data_version() once."""
    version = known_data_version(root)
    if version is None:
        version = data_version(root)
        remember_data_version(version, root)
    return version


def known_data_version(root: Path = Path(".")) -> str | None:
    """The data version of root's data/raw already known to this run (no hashing), else None."""
    version, _, raw = os.environ.get(DATA_VERSION_ENV, "").partition(" ")
    return version if version and raw == str(Path(root).resolve() / paths.RAW) else None


def remember_data_version(version: str, root: Path = Path(".")) -> None:
    """Record the data version for the rest of this run, including the stage processes it starts."""
    os.environ[DATA_VERSION_ENV] = f"{version} {Path(root).resolve() / paths.RAW}"


def forget_data_version() -> None:
    """data/raw is about to change: a version recorded earlier in this run no longer holds."""
    os.environ.pop(DATA_VERSION_ENV, None)


def _open_dvc_repo(root: Path):
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        return Repo(str(root))
    except NotDvcRepoError:
        return None
