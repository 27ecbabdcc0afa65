"""Files and folders as the results need them: atomic writes, and what guards a run folder.

Every file is written to a temporary sibling and renamed into place, so a run killed
mid-write leaves the previous complete file (or none), never half a JSON. A write the file
system refuses (read-only, full, not a folder) is one line (`write_failed`); a user's file is
read only when it is a regular one (`regular_file`); a run folder is held by one run at a
time (`run_lock`) and given back as it was when a rerun fails (`kept_on_failure`).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from clip_utils.errors import InvalidValue, MissingFile, Refused, UserError


class WriteFailed(UserError, OSError):
    """A results file or folder could not be written (read-only, full, or not a folder)."""


# The errors that say the place cannot take the write, not that our code is wrong.
WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST,
                errno.EISDIR, errno.EFBIG}
_SIGNS = ("No space left", "Read-only file system", "Disk quota", "Permission denied")


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def write_failed(path: str | Path, err: BaseException, written: int | None = None,
                 what: str | None = None) -> WriteFailed | None:
    """The one-line error for a write the file system refused, or None for any other failure.

    Args:
        path: the file or folder being written.
        err: what the write raised (an `OSError`, or a library's own error for a full disk).
        written: bytes of the failed write that reached the disk, when known.
        what: the line's subject (default: "cannot write PATH").
    """
    path = Path(path)
    if isinstance(err, UserError):  # already said (a nested write)
        return None
    code = getattr(err, "errno", None)
    if code not in WRITE_ERRNOS and not any(sign in str(err) for sign in _SIGNS):
        return None
    reason = os.strerror(code) if code in WRITE_ERRNOS else str(err).splitlines()[0]
    where = _existing(path.parent)
    try:
        free = f"{shutil.disk_usage(where).free:,} bytes free there"
    except OSError:
        free = "free space unknown"
    size = f"{written:,} bytes written before it failed, " if written is not None else ""
    what = what or f"cannot write {path}"
    return WriteFailed(f"{what}: {reason} ({size}{free}): free some space, or choose another --results-dir")


def check_writable(folder: str | Path) -> Path:
    """Make sure results can be written under `folder` before any slow work starts.

    Args:
        folder: the results folder (created when missing).

    Raises:
        WriteFailed: it is a file, or on a read-only or full file system, or not ours to write.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        failed = write_failed(folder / ".write-check", err, what=f"the results folder {folder} cannot be written")
        if failed is None:
            raise
        raise failed from None
    return folder


def _process_umask() -> int:
    umask = os.umask(0)  # the only way to read it; set straight back, once, at import
    os.umask(umask)
    return umask


UMASK = _process_umask()


def publish(path: str | Path) -> None:
    """Give a file or folder made by `tempfile` (0600/0700) the permissions `open`/`mkdir` would.

    A folder's contents get them too: some writers (safetensors) create their files 0600.

    Args:
        path: the file or folder.
    """
    path = Path(path)
    if path.is_dir():
        for child in path.rglob("*"):
            if not child.is_symlink():
                os.chmod(child, (0o777 if child.is_dir() else 0o666) & ~UMASK)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` if the block succeeds.

    The file is flushed to disk before the rename, so after a crash or power loss `path`
    holds either the previous complete file or the new complete one.

    Args:
        path: the final file path.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise write_failed(path, err) or err from err
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        publish(tmp_path)
        os.replace(tmp_path, path)
    except Exception as err:  # a full or read-only disk is the user's to fix: one line, not a traceback
        written = tmp_path.stat().st_size if tmp_path.exists() else None
        failed = write_failed(path, err, written)
        if failed is None:
            raise
        raise failed from err
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; swap it in for `path` if the block succeeds.

    A crash mid-write leaves the previous folder (or none), never a half-written one; the
    swap is two renames, and the previous folder is deleted only after the new one is in place.

    Args:
        path: the final folder.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as err:
        raise write_failed(path, err) or err from err
    old = path.with_name(f".{path.name}.old")
    try:
        yield tmp
        publish(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old.exists() and not path.exists():  # the swap failed half-way: the previous folder goes back
                os.replace(old, path)
            raise
    except Exception as err:  # as atomic_path: a refused write is one line
        failed = write_failed(path, err)
        if failed is None:
            raise
        raise failed from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf: write null rather than an invalid file.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return _clean(value.item())
    return value


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON, atomically.

    Args:
        path: output file.
        data: JSON-able data (numpy/torch scalars and non-finite floats are converted).
    """
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_clean(data), indent=1) + "\n")
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically.

    Args:
        path: output file.
        text: its content.
    """
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def read_json(path: str | Path) -> Any:
    """Read a JSON file, naming the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"results file missing: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InvalidValue(f"{path} is not valid JSON ({err}); delete it and rerun") from err


def regular_file(path: str | Path, what: str = "file") -> Path:
    """`path` if it is a regular file (or a link to one): every file the program reads is checked so.

    A named pipe or a device would block a reader forever (or stream without end), and a
    folder is a mistake in the path: each is refused in one line naming the path.

    Args:
        path: the file to read.
        what: what the file is, for the message (`photo`, `descriptions file`, ...).

    Raises:
        MissingFile: nothing is there.
        InvalidValue: something other than a regular file is there.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise MissingFile(f"{what} not found: {path}") from None
    except OSError as err:
        raise InvalidValue(f"cannot read {what} {path}: {os.strerror(err.errno) if err.errno else err}") from None
    if stat.S_ISREG(mode):
        return path
    kind = ("a folder" if stat.S_ISDIR(mode) else "a named pipe" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device")
    raise InvalidValue(f"{path} is not a regular file ({kind}): pass the {what} file itself")


def write_csv(path: str | Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """Write a CSV file atomically.

    Args:
        path: output file.
        header: column names.
        rows: one sequence per row.
    """
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return Path(path)


def write_predictions(
    path: str | Path, paths: Sequence[str], labels: Sequence[int], preds: Sequence[int],
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write predictions.csv: `path,label,pred` (plus names when `class_names` is given).

    Args:
        path: output file.
        paths: image files.
        labels: true labels.
        preds: predicted labels.
        class_names: names in label order, adds `label_name,pred_name` columns.
    """
    header = ["path", "label", "pred"]
    rows = [[p, int(y), int(q)] for p, y, q in zip(paths, labels, preds, strict=True)]
    if class_names is not None:
        header += ["label_name", "pred_name"]
        rows = [r + [class_names[r[1]], class_names[r[2]]] for r in rows]
    return write_csv(path, header, rows)


@contextlib.contextmanager
def run_lock(folder: str | Path) -> Iterator[None]:
    """Hold the lock of one run folder for the block: a second run into it is refused.

    `fcntl.flock` on a file beside the folder, so a killed run leaves no stale lock (the
    kernel drops it with the process); runs into other folders (another dataset or method)
    go on side by side. A run that wrote nothing (refused, or failed before its first file)
    leaves nothing: the lock file and the folders made for it are removed again.

    Args:
        folder: the run's results folder.

    Raises:
        Refused: another process holds it.
    """
    folder = Path(folder)
    lock = folder.parent / f".{folder.name}.lock"
    made = [p for p in (lock.parent, *lock.parent.parents) if not p.exists()]  # deepest first
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a+")
    except OSError as err:
        raise write_failed(lock, err) or err from err
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Refused(f"another run is writing {folder}: wait for it to finish, or use another --results-dir") from None
        try:
            yield
        finally:
            if not folder.exists():  # nothing written: no empty folders for a report to find
                with contextlib.suppress(OSError):
                    lock.unlink()
                    for parent in made:
                        parent.rmdir()
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def kept_on_failure(folder: str | Path, skip: tuple[str, ...] = ("shots_",)) -> Iterator[None]:
    """Run a block that rewrites `folder`; if it fails, put the folder back as it was.

    A fresh run clears its folder's earlier results before writing its own (so old metrics
    never sit beside new curves). When the run then fails (a full disk, a bug), this brings
    the earlier, complete results back, so a failed rerun loses nothing. The copy is made of
    hard links, so it costs no space and no time. An interrupt (Ctrl-C, SIGTERM) is not a
    failure: what the run saved (its resume state) stays.

    Args:
        folder: the run's results folder.
        skip: names starting with these are left out (a full-data run's folder holds its
            few-shot runs' folders, which the run does not touch).
    """
    folder = Path(folder)
    entries = [p for p in folder.iterdir() if not p.name.startswith(skip)] if folder.is_dir() else []
    if not entries:
        yield
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{folder.name}.previous.", dir=folder.parent))
    try:
        for path in entries:
            if path.is_dir():
                shutil.copytree(path, backup / path.name, copy_function=os.link, symlinks=True)
            else:
                os.link(path, backup / path.name)
        yield
    except Exception:
        for path in folder.iterdir():
            if not path.name.startswith(skip):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        for path in backup.iterdir():
            os.replace(path, folder / path.name)
        raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)
