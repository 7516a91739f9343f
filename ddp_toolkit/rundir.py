"""The run directory as a resource: one run at a time, writable before training, an old run moved aside.

- `RunDirLock(run_dir).acquire()` (rank 0 of a run only): an exclusive `flock` on `run_dir/.lock`, which
  records the holder's pid, host and start time. The kernel releases it when the holder exits or dies, so a
  stale lock of a killed run never blocks the next one. A second run into the same run_dir is refused with
  `RunDirBusy`, naming the holder.
- `check_writable(run_dir)`: run_dir, checkpoints/ and final/ exist (created if needed) and accept a file,
  checked before training instead of at the first checkpoint.
- `check_shared(run_dir, ...)`: every rank sees the file rank 0 wrote into run_dir (a multi-node run needs one
  run_dir on a shared file system); `RunDirNotShared` otherwise, on every rank.
- `archive_previous_run(run_dir)`: a fresh run moves the outputs of an older run into
  `run_dir/previous/<UTC time>/`; nothing is deleted.
- `atomic_write`/`atomic_path`: outputs replace their file atomically; a symlink in the way is replaced,
  never written through.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ddp_toolkit.errors import InputError, RunError

__all__ = ["OUTPUT_NAMES", "RunDirBusy", "RunDirLock", "RunDirUnwritable", "append_line", "archive_previous_run",
           "atomic_path", "atomic_write", "check_shared", "check_writable", "describe_os_error", "os_error_in",
           "RunDirNotShared"]

LOCK_NAME = ".lock"
PREVIOUS_DIR = "previous"
OUTPUT_NAMES = ("checkpoints", "final", "metrics.jsonl", "summary.json", "plan.json", "loss_vs_iteration.png",
                "loss_vs_samples.png", "lr_vs_iteration.png", "throughput_vs_iteration.png", "report.html", "wandb",
                "tensorboard", "mlflow.db", "mlflow-artifacts", "trackers.json")
"""What a run writes into run_dir, and so what `archive_previous_run` moves aside (nothing else is touched)."""


class RunDirBusy(InputError):
    """Another run holds the run directory."""


class RunDirUnwritable(InputError):
    """The run directory (or a folder the run writes into) cannot be created or written."""


def describe_os_error(err: OSError) -> str:
    """`No space left on device (ENOSPC)`: the reason of an OSError in a few words, for one-line messages."""
    code = errno.errorcode.get(err.errno or 0)
    reason = err.strerror or type(err).__name__
    return f"{reason} ({code})" if code else reason


def os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind a write failure: itself, its cause/context (torch), or `os error N` (safetensors)."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    found = re.search(r"os error (\d+)", str(err))
    return OSError(int(found.group(1)), os.strerror(int(found.group(1)))) if found else None


# ---- one run at a time ---------------------------------------------------------------------------------------
def _holder_text(holder: dict | None) -> str:
    if holder is None:
        return "another run (holder unknown)"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} (started {holder.get('started', '?')})"


def _exited(holder: dict | None) -> bool:
    """True when the recorded holder is a process of this host that no longer exists."""
    if holder is None or holder.get("host") != socket.gethostname() or type(holder.get("pid")) is not int:
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


class RunDirLock:
    """An exclusive lock on a run directory, held by rank 0 of a run for the whole run.

    Use `with RunDirLock(run_dir, rank=env.rank):` or `lock = RunDirLock(run_dir).acquire()` ... `lock.release()`.
    On a rank other than 0 acquiring does nothing, so the other ranks of the same run are never refused.
    The lock belongs to the open file: a process forked while holding it (a data-loader worker) shares it.
    """

    def __init__(self, run_dir: Path | str, rank: int = 0) -> None:
        self.run_dir, self.rank = Path(run_dir), rank
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, grace_s: float = 15.0) -> RunDirLock:
        """Take the lock or raise `RunDirBusy` naming the holder; returns self.

        When the recorded holder has exited but the lock is still held (a data-loader worker it forked has not
        noticed yet), wait up to `grace_s` seconds for it to go; a live holder is refused at once.
        """
        if self.rank != 0 or self._fd is not None:
            return self
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise RunDirUnwritable(f"cannot create the lock file {self.path}: {describe_os_error(err)}") from None
        deadline = time.monotonic() + grace_s
        while not self._try_lock(fd):
            holder = self.holder()
            if not _exited(holder) or time.monotonic() >= deadline:
                os.close(fd)
                orphan = "; it has exited but a process it started still holds the lock" if _exited(holder) else ""
                raise RunDirBusy(f"run_dir {self.run_dir} is in use by {_holder_text(holder)}{orphan}; wait for "
                                 f"that run to end or choose another run_dir")
            time.sleep(0.2)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def _try_lock(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            os.close(fd)
            raise RunDirUnwritable(f"cannot lock {self.path}: {describe_os_error(err)}") from None
        return True

    def holder(self) -> dict | None:
        """What the lock file says about its (last) holder, or None when it says nothing readable."""
        try:
            with open(self.path, "rb") as fh:
                data = json.loads(fh.read(4096) or b"null")
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def release(self) -> None:
        """Free the lock (the file stays, emptied: unlinking it would let two runs lock different files)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the last descriptor of the open file releases the flock

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---- writable before training --------------------------------------------------------------------------------
def check_writable(run_dir: Path | str, subdirs: tuple[str, ...] = ("checkpoints", "final")) -> None:
    """Create run_dir and its output folders and write a probe file in each; `RunDirUnwritable` names the path."""
    run_dir = Path(run_dir)
    for path in (run_dir, *(run_dir / s for s in subdirs)):
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirUnwritable(f"cannot create {path}: {describe_os_error(err)}") from None
        if not path.is_dir():
            raise RunDirUnwritable(f"{path} exists and is not a directory")
        try:
            fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise RunDirUnwritable(f"cannot write into {path}: {describe_os_error(err)}") from None


# ---- one run_dir for every rank (#22) -------------------------------------------------------------------------
SHARED_CHECK_NAME = ".shared-check"


class RunDirNotShared(InputError):
    """Some ranks do not see the run directory rank 0 writes into (not on a shared file system)."""


def check_shared(run_dir: Path | str, rank: int, world_size: int,
                 reduce_sum: Callable[[list[float]], list[float]]) -> None:
    """Rank 0 writes a random token into run_dir; after a sum over ranks (the barrier, which also hands every rank
    the token) each rank reads it back; a second sum counts the ranks that could not, and all of them raise.

    `reduce_sum` sums floats over ranks (dist.all_reduce_sum); the token fits a float64 exactly (48 bits).
    """
    path = Path(run_dir) / SHARED_CHECK_NAME
    token = int.from_bytes(os.urandom(6), "big") if rank == 0 else 0
    if rank == 0:
        atomic_write(path, str(token))
    token = int(reduce_sum([float(token)])[0])
    try:
        seen = path.read_text() == str(token)
    except OSError:
        seen = False
    missing = int(reduce_sum([0.0 if seen else 1.0])[0])
    if rank == 0:
        with contextlib.suppress(OSError):
            path.unlink()
    if missing:
        raise RunDirNotShared(f"run_dir {run_dir} is not shared: {missing} of {world_size} ranks cannot read the "
                              f"file rank 0 wrote there; a multi-node run needs a run_dir on a shared file system")


# ---- a fresh run moves an older run aside ----------------------------------------------------------------------
def _holds_something(path: Path) -> bool:
    """False for an empty folder (what check_writable creates), True for anything else that exists."""
    if path.is_symlink() or not path.is_dir():
        return os.path.lexists(path)
    return any(path.iterdir())


def archive_previous_run(run_dir: Path | str, names: tuple[str, ...] = OUTPUT_NAMES) -> list[Path]:
    """Move an older run's outputs (OUTPUT_NAMES that exist, empty folders aside) into previous/<UTC time>/.

    Returns the new paths, [] when there was nothing to move. Nothing is deleted; symlinks move as links;
    `.lock`, `previous/` and any file the toolkit does not write stay where they are. Rank 0 only, under the lock.
    """
    run_dir = Path(run_dir)
    found = [run_dir / n for n in names if _holds_something(run_dir / n)]
    if not found:
        return []
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = run_dir / PREVIOUS_DIR / stamp
    for n in range(1, 1000):
        try:
            dest.mkdir(parents=True)
            break
        except FileExistsError:
            dest = run_dir / PREVIOUS_DIR / f"{stamp}-{n}"
        except OSError as err:
            raise RunError(f"cannot create {dest} to move the previous run aside: {describe_os_error(err)}") from None
    moved = []
    for src in found:
        try:
            os.rename(src, dest / src.name)
        except OSError as err:
            raise RunError(f"cannot move {src} to {dest}: {describe_os_error(err)}; moved so far: "
                           f"{[p.name for p in moved] or 'nothing'}") from None
        moved.append(dest / src.name)
    return moved


# ---- atomic outputs -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is fsync'd and replaces `path` atomically.

    A symlink at `path` is replaced by the new file, never written through. On any error the temporary file
    is removed and an OSError becomes a one-line `RunError` naming `path`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        os_err = os_error_in(err) if isinstance(err, Exception) else None
        if os_err is not None:
            raise RunError(f"cannot write {path}: {describe_os_error(os_err)}") from None
        raise


def atomic_write(path: Path | str, data: str | bytes) -> Path:
    """Write text or bytes to `path` by atomic replace (see `atomic_path`)."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    return path


def append_line(path: Path | str, line: str) -> None:
    """Append one line to a log file; a write error cuts the partial line back off and becomes a `RunError`.

    A symlink at `path` is refused (O_NOFOLLOW), so an append never lands outside the run directory.
    """
    path, data = Path(path), (line + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        why = "it is a symbolic link" if err.errno == errno.ELOOP else describe_os_error(err)
        raise RunError(f"cannot append to {path}: {why}") from None
    size = -1
    try:
        size = os.fstat(fd).st_size
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError as err:
        with contextlib.suppress(OSError, ValueError):
            os.ftruncate(fd, size)  # no torn line left for the next run to trip on
        raise RunError(f"cannot append to {path}: {describe_os_error(err)}") from None
    finally:
        os.close(fd)
