"""Outputs that survive a kill: atomic file writes, atomic folder replacement, and a lock on an output folder.

A process killed at any instant (SIGKILL, OOM killer, power loss after the fsyncs) leaves each output written
through these functions either as it was before or complete in its new form, never half-written and never gone:

- `write_text_atomic`: a file is written under a temporary name, fsynced, and renamed over the old one.
- `partial_folder` / `replace_folder`: a folder is written as a sibling `<name>.partial`, fsynced, and swapped in
  by two renames (old -> `<name>.previous`, new -> `<name>`); the old copy is deleted only after the swap.
  `recover_folder`, called by the next run before it looks at the folder, finishes or undoes an interrupted swap.
- `FolderLock`: one writer per output folder (`flock` on a file inside it, released by the kernel when its
  holder exits, however it exits, so a killed holder never leaves a stale lock).

Used by the trainer (stage checkpoints, resume checkpoints, summary), `omniola convert` (--overwrite),
`omniola build` and the default-model maker.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from pathlib import Path

from .errors import OutputInUseError

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
PREVIOUS_SUFFIX = ".previous"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flushes every file under `folder`, then the folders themselves (their entries), to disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if not path.is_symlink():
                _fsync_path(path)
        _fsync_path(Path(root))


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Writes `text` to `path` atomically: a temporary file in the same folder, fsync, then `os.replace`.

    A reader (or the next run after a kill) sees the old content or the new, never a torn file. A kill before
    the rename leaves a hidden `.<name>.<pid>.tmp` file next to `path`, which the next write of `path` by a
    process with the same pid would overwrite and which is otherwise harmless.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding=encoding) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def partial_folder(target: str | os.PathLike) -> Path:
    """The sibling folder a new version of `target` is written into before `replace_folder` swaps it in."""
    target = Path(target)
    return target.with_name(target.name + PARTIAL_SUFFIX)


def previous_folder(target: str | os.PathLike) -> Path:
    """The sibling name the old version of `target` has while a new one is swapped in."""
    target = Path(target)
    return target.with_name(target.name + PREVIOUS_SUFFIX)


def recover_folder(target: str | os.PathLike) -> Path:
    """Finishes or undoes a `replace_folder` of `target` that a kill interrupted; call it before reading `target`.

    Recovery rule (the swap renames `target` -> `target.previous`, then `target.partial` -> `target`, then deletes
    `target.previous`):

    - `target` is missing and `target.previous` exists: the kill came between the two renames, so the old
      version is restored (renamed back to `target`); the new one is discarded.
    - `target` and `target.previous` both exist: the swap happened; the old copy is deleted.
    - `target.partial` exists: an unfinished (or not yet swapped-in) new version; it is deleted.

    Either the old or the new version of `target` is therefore always complete, and after this call only
    `target` (if it ever existed) remains.

    Returns:
        `target`.
    """
    target = Path(target)
    previous = previous_folder(target)
    if previous.exists():
        if target.exists() or target.is_symlink():
            shutil.rmtree(previous)
        else:
            logger.warning("%s: an interrupted replacement left the previous version at %s; restoring it",
                           target, previous)
            os.rename(previous, target)
    partial = partial_folder(target)
    if partial.exists():
        shutil.rmtree(partial)
    return target


def new_partial_folder(target: str | os.PathLike) -> Path:
    """Recovers `target` (see `recover_folder`) and creates an empty `target.partial` to write a new version into."""
    partial = partial_folder(recover_folder(target))
    partial.mkdir(parents=True)
    return partial


def replace_folder(partial: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Swaps the complete folder `partial` in as `target`, keeping the old `target` until the swap has happened.

    Steps: fsync `partial`; rename `target` to `target.previous` (when it exists); rename `partial` to `target`;
    fsync the parent folder; delete `target.previous`. A kill between any two steps leaves the old or the new
    version complete, and `recover_folder` (run by the next writer) cleans up; see its recovery rule.

    Args:
        partial: The new version, usually `partial_folder(target)` (same filesystem, so renames are atomic).
        target: The folder to replace (or create).

    Returns:
        `target`.
    """
    partial, target = Path(partial), Path(target)
    fsync_tree(partial)
    previous = previous_folder(target)
    if previous.exists():  # a leftover of an earlier interrupted swap whose new version is in place
        shutil.rmtree(previous)
    had_old = target.exists() or target.is_symlink()
    if had_old:
        os.rename(target, previous)
    try:
        os.rename(partial, target)
    except BaseException:
        if had_old:
            os.rename(previous, target)
        raise
    _fsync_path(target.parent)
    if had_old:
        shutil.rmtree(previous)
    return target


class FolderLock:
    """An exclusive lock on an output folder, held from `acquire` (or `with`) to `release` or process exit.

    The lock is `fcntl.flock` on `<folder>/<name>`, which holds the holder's pid for the error message. The
    kernel drops the lock when the holder's process ends, so the file left behind by a killed process does not
    block the next run.

    Args:
        folder: The folder to lock (created if missing).
        name: The lock file's name inside `folder`.
        holder: What holds it, for the error message ("trainer").
    """

    def __init__(self, folder: str | os.PathLike, name: str = ".lock", holder: str = "process"):
        self.folder, self.holder = Path(folder), holder
        self.path = self.folder / name
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        """Takes the lock.

        Raises:
            OutputInUseError: another process holds it; the message names the folder and the holder's pid.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputInUseError(
                f"{self.folder} is in use by another {self.holder} (pid {pid}, lock file {self.path}); wait for it "
                "to finish or choose another output folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drops the lock (the file stays; it is reused by the next holder)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
