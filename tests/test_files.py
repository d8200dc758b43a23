"""omniola.files: a folder replaced while the process is SIGKILLed at each step keeps one whole version, and the
next run recovers it; atomic text writes; the output-folder lock."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from omniola import files
from omniola.errors import OutputInUseError

PARTS = ("config.json", "model.safetensors", "tokenizer.json")


def write_version(folder: Path, version: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in PARTS:
        (folder / name).write_text(f"{version} {name}\n" + version * 10_000)


def read_version(folder: Path) -> str:
    """The one version every part of `folder` holds (fails on a missing, torn or mixed folder)."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(PARTS)
    versions = {(folder / name).read_text().split(" ", 1)[0] for name in PARTS}
    assert len(versions) == 1, versions
    version = versions.pop()
    for name in PARTS:
        assert (folder / name).read_text() == f"{version} {name}\n" + version * 10_000
    return version


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _replace_in_child(target: Path, kill_at: str) -> int:
    """Replaces `target`'s "old" version with "new" in a forked child that SIGKILLs itself at `kill_at`; returns the
    child's wait status."""
    pid = os.fork()
    if pid:
        return os.waitpid(pid, 0)[1]
    try:  # the child: only file operations, then it dies or exits
        rename, rmtree = os.rename, shutil.rmtree
        if kill_at == "before-swap":  # the new folder is complete, nothing renamed yet
            os.rename = lambda a, b: _die() if Path(b).name.endswith(".previous") else rename(a, b)
        elif kill_at == "between-renames":  # the old folder moved aside, the new one not yet in place
            os.rename = lambda a, b: _die() if Path(a).name.endswith(".partial") else rename(a, b)
        elif kill_at == "deleting-old":  # the new folder in place, the old one half deleted
            def half_rmtree(path, *args, **kwargs):
                if Path(path).name.endswith(".previous"):
                    (Path(path) / PARTS[0]).unlink()
                    _die()
                rmtree(path, *args, **kwargs)

            shutil.rmtree = half_rmtree
        partial = files.new_partial_folder(target)
        if kill_at == "writing-new":
            (partial / PARTS[0]).write_text("new, half written")
            _die()
        write_version(partial, "new")
        files.replace_folder(partial, target)
    finally:
        os._exit(0)


@pytest.mark.parametrize("kill_at, kept", [("writing-new", "old"), ("before-swap", "old"),
                                           ("between-renames", "old"), ("deleting-old", "new"), ("never", "new")])
def test_a_replace_killed_at_any_step_keeps_one_whole_version(tmp_path, kill_at, kept):
    target = tmp_path / "out"
    write_version(target, "old")
    status = _replace_in_child(target, kill_at)
    if kill_at == "never":
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    else:
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    if kill_at == "between-renames":  # the worst instant: no `out` at all until the next run recovers it
        assert not target.exists() and files.previous_folder(target).is_dir()
    files.recover_folder(target)
    assert read_version(target) == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # and the next replace after the recovery goes through
    assert _replace_in_child(target, "never") == 0 and read_version(target) == "new"


def test_replace_creates_a_missing_target_and_a_failed_swap_restores_the_old(tmp_path, monkeypatch):
    target = tmp_path / "out"
    partial = files.new_partial_folder(target)
    write_version(partial, "new")
    files.replace_folder(partial, target)
    assert read_version(target) == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    partial = files.new_partial_folder(target)
    write_version(partial, "newer")
    rename = os.rename

    def failing(a, b):
        if Path(a).name.endswith(".partial"):
            raise OSError("disk error")
        rename(a, b)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError, match="disk error"):
        files.replace_folder(partial, target)
    assert read_version(target) == "new"


def test_write_text_atomic_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    files.write_text_atomic(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
time.sleep(120)
"""


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding `path` with flock (as a second trainer would), until it is killed."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_folder_lock_refuses_a_second_holder_and_a_killed_holder_does_not_block(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = hold_lock(folder / ".lock")
    try:
        with pytest.raises(OutputInUseError, match=rf"{folder} is in use by another trainer \(pid {holder.pid},"):
            files.FolderLock(folder, holder="trainer").acquire()
    finally:
        holder.kill()
        holder.wait()
    # the killed holder's lock file is still there, with its pid, but it no longer locks anything
    assert (folder / ".lock").read_text().strip() == str(holder.pid)
    with files.FolderLock(folder) as lock:
        assert (folder / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(OutputInUseError, match=f"pid {os.getpid()}"):  # a second lock, even in this process
            files.FolderLock(folder).acquire()
    assert lock._fd is None
    files.FolderLock(folder).acquire().release()
