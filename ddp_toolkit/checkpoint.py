"""Atomic checkpoints with everything a bit-exact resume needs; pruning and resume touch only their own files.

Layout of `run_dir/checkpoints/`:
  it00000040/model.safetensors   weights (safetensors: no code runs on load)
  it00000040/state.pt            optimizer, scheduler, progress, sampler, fingerprint (torch.load(weights_only=True))
  it00000040/rng-rank{r}.pt      RNG states of every rank
  it00000040/manifest.json       iteration, size and sha256 of every file, written last inside the directory
  latest                         name of the newest complete checkpoint of this run, replaced last

A sharded engine (fsdp) writes `.metadata` and one `__{rank}_0.distcp` per rank (torch.distributed.checkpoint:
model and optimizer, keyed by parameter name, loadable at any world size) instead of model.safetensors and the
optimizer in state.pt; its manifest says `"format": "sharded"` and covers every shard.

A checkpoint is written under a temporary name, every file fsync'd, then renamed; `latest` moves after the
rename. A crash or a write error at any point leaves the previous checkpoint loadable.

Own files are real directories named `it` + 8 digits, nothing else: a backup `it00000010_best`, a folder
`it_notes` or a symlink is never pruned, resumed from or followed. A manifest names plain regular files inside
its own directory only; anything else makes the checkpoint damaged (skipped with a warning), never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ddp_toolkit.errors import EXIT_INPUT, EXIT_RUN, RunError, ToolkitError
from ddp_toolkit.rng import rng_state, set_rng_state
from ddp_toolkit.rundir import describe_os_error, os_error_in

__all__ = ["CheckpointError", "CheckpointWriteError", "checkpoint_name", "find_latest", "is_sharded", "load_checkpoint",
           "rng_state", "save_checkpoint", "set_rng_state", "verify"]  # rng_state/set_rng_state live in rng.py

MANIFEST = "manifest.json"
LATEST = "latest"
REQUIRED_FILES = ("model.safetensors", "state.pt")
SHARDED, SHARDED_FILES = "sharded", (".metadata", "state.pt")
NAME_PATTERN = re.compile(r"it(\d{8})")
_TMP_PATTERN = re.compile(r"\.tmp-it\d{8}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_MANIFEST_BYTES = 1 << 20


class CheckpointError(ToolkitError):
    """A checkpoint that cannot be used; the message names the file and the problem."""

    exit_code = EXIT_INPUT


class CheckpointWriteError(CheckpointError, RunError):
    """A checkpoint could not be written (disk full, no permission, read-only); the previous one is intact."""

    exit_code = EXIT_RUN


class _Damaged(Exception):
    """Internal: what is wrong with a checkpoint directory."""


def checkpoint_name(iteration: int) -> str:
    """`it00000040`: the directory name of the checkpoint after `iteration` iterations."""
    return f"it{iteration:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_regular(path: Path) -> int:
    """A read descriptor on a regular file; never follows a symlink, never blocks on a FIFO or device."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        kind = "a symlink" if err.errno == errno.ELOOP else describe_os_error(err)
        raise _Damaged(f"{path} cannot be read: {kind}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _Damaged(f"{path} is not a regular file")
    return fd


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with os.fdopen(_open_regular(path), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_own_dir(path: Path) -> bool:
    """A real directory (not a symlink) named exactly `it` + 8 digits."""
    return NAME_PATTERN.fullmatch(path.name) is not None and path.is_dir() and not path.is_symlink()


def _own_dirs(root: Path) -> list[Path]:
    try:
        return [p for p in root.iterdir() if _is_own_dir(p)]
    except OSError:
        return []


def _check_file_entry(fname, meta) -> None:
    if not isinstance(fname, str) or fname in ("", ".", "..", MANIFEST) or any(c in fname for c in "/\\\0"):
        raise _Damaged(f"the manifest names {fname!r}, which is not a plain file name inside the checkpoint")
    if not (isinstance(meta, dict) and type(meta.get("bytes")) is int and meta["bytes"] >= 0
            and isinstance(meta.get("sha256"), str) and _SHA256.fullmatch(meta["sha256"])):
        raise _Damaged(f"the manifest entry for {fname} is not {{bytes, sha256}}")


def _manifest(path: Path) -> dict:
    """The manifest of checkpoint directory `path`, checked for shape; raises _Damaged."""
    if path.is_symlink() or not path.is_dir():
        raise _Damaged(f"{path} is not a directory")
    with os.fdopen(_open_regular(path / MANIFEST), "rb") as fh:
        raw = fh.read(_MAX_MANIFEST_BYTES + 1)
    try:
        manifest = json.loads(raw) if len(raw) <= _MAX_MANIFEST_BYTES else None
    except ValueError:
        manifest = None
    if not (isinstance(manifest, dict) and type(manifest.get("iteration")) is int and manifest["iteration"] >= 0
            and isinstance(manifest.get("files"), dict)):
        raise _Damaged(f"{path / MANIFEST} is not a manifest ({{iteration, files}})")
    for fname, meta in manifest["files"].items():
        _check_file_entry(fname, meta)
    if manifest.get("format", "full") not in ("full", SHARDED):
        raise _Damaged(f"{path / MANIFEST} names an unknown format {manifest['format']!r}")
    required = SHARDED_FILES if manifest.get("format") == SHARDED else REQUIRED_FILES
    missing = [f for f in required if f not in manifest["files"]]
    if missing:
        raise _Damaged(f"{path / MANIFEST} does not list {', '.join(missing)}")
    named = NAME_PATTERN.fullmatch(path.name)
    if named and int(named.group(1)) != manifest["iteration"]:
        raise _Damaged(f"{path / MANIFEST} records iteration {manifest['iteration']}, not the one in its name")
    return manifest


def verify(path: Path) -> str | None:
    """None if the checkpoint directory is complete and undamaged, else what is wrong with it."""
    path = Path(path)
    try:
        for fname, meta in _manifest(path)["files"].items():
            f = path / fname
            if not os.path.lexists(f):
                return f"{f} is missing"
            if f.lstat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
                return f"{f} is damaged (size or sha256 differs from the manifest)"
    except _Damaged as err:
        return str(err)
    except OSError as err:
        return f"{path} cannot be read: {describe_os_error(err)}"
    return None


# ---- save -----------------------------------------------------------------------------------------------------
def _write_pt(obj, path: Path) -> None:
    with open(path, "wb") as fh:  # a file object: a disk error surfaces as OSError, not torch's "unexpected pos"
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _write_files(tmp: Path, rank: int, model_state: dict | None, state: dict | None,
                 sharded: dict | None = None) -> None:
    _write_pt(rng_state(), tmp / f"rng-rank{rank}.pt")
    if sharded is not None:  # collective: every rank writes its shard, rank 0 the metadata (fsync'd)
        import torch.distributed.checkpoint as dcp

        dcp.save(sharded, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True, overwrite=False))
        if rank == 0:
            _write_pt(state, tmp / "state.pt")
        return
    if rank == 0:
        weights = tmp / "model.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, weights)
        _fsync_file(weights)
        _write_pt(state, tmp / "state.pt")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_manifest(tmp: Path, iteration: int) -> None:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())
             if p.name != MANIFEST}
    path = tmp / MANIFEST
    sharded = {"format": SHARDED} if ".metadata" in files else {}
    path.write_text(json.dumps({"iteration": iteration, **sharded, "files": files}, indent=1))
    _fsync_file(path)


def _prepare(root: Path, tmp: Path, final: Path) -> None:
    """Rank 0: the checkpoint folder exists, leftovers of crashed saves are gone, an empty `tmp` is ready."""
    root.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(final) and not _is_own_dir(final):
        raise CheckpointWriteError(f"cannot write checkpoint {final}: that name is taken by something that is "
                                   f"not a checkpoint directory; move it away")
    for entry in root.iterdir():
        if _TMP_PATTERN.fullmatch(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    tmp.mkdir()


def _point_latest(root: Path, name: str) -> None:
    tmp = root / ".latest.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, (name + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, root / LATEST)  # replaces a symlink named `latest` itself, never its target
    _fsync_dir(root)


def _publish(root: Path, tmp: Path, final: Path, iteration: int) -> None:
    """Rank 0: manifest, rename into place (an older copy of the same name is kept until then), `latest`."""
    _write_manifest(tmp, iteration)
    _fsync_dir(tmp)
    old = root / f".old-{final.name}"
    if _is_own_dir(final):
        if os.path.lexists(old):
            shutil.rmtree(old)
        os.rename(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        if os.path.lexists(old):
            os.rename(old, final)
        raise
    _fsync_dir(root)
    _point_latest(root, final.name)
    shutil.rmtree(old, ignore_errors=True)


def _attempt(step: Callable[[], None], final: Path, root: Path) -> CheckpointWriteError | None:
    """Run one write step; a disk error becomes a one-line CheckpointWriteError naming the path."""
    try:
        step()
    except CheckpointWriteError as err:
        return err
    except Exception as err:
        os_err = os_error_in(err)
        if os_err is None:
            raise
        where = f" ({os_err.filename})" if getattr(os_err, "filename", None) else ""
        previous = _read_latest(root, warn=False)
        return CheckpointWriteError(f"cannot write checkpoint {final}{where}: {describe_os_error(os_err)}; "
                                    f"previous checkpoint: {previous or 'none'} (intact)")
    return None


def _agree(err: CheckpointWriteError | None, barrier: Callable[[], None],
           all_ok: Callable[[bool], bool] | None, final: Path) -> CheckpointWriteError | None:
    """Barrier; with `all_ok` (an all-reduce of booleans) every rank learns of a failure on any rank."""
    if all_ok is None:
        if err is None:
            barrier()
        return err
    ok_everywhere = all_ok(err is None)
    if err is None and not ok_everywhere:
        err = CheckpointWriteError(f"cannot write checkpoint {final}: writing failed on another rank")
    return err


def save_checkpoint(root: Path, iteration: int, *, model_state: dict | None, state: dict | None,
                    rank: int, barrier: Callable[[], None], keep: int = 2,
                    all_ok: Callable[[bool], bool] | None = None, sharded: dict | None = None) -> Path:
    """Write checkpoint `it{iteration}` atomically. Every rank calls it; rank 0 writes the shared files.

    `model_state`/`state` are only needed on rank 0; every rank writes its own RNG state. A disk error raises
    CheckpointWriteError (one line, the previous checkpoint intact, the temporary directory removed). Pass
    `all_ok` (True on every rank → True) so that every rank raises it; with `barrier` only, the failing rank
    raises and the others wait at the barrier until the process group's timeout. `sharded` (every rank: its
    DCP state dict) replaces `model_state` and is written by every rank.
    """
    root = Path(root)
    name = checkpoint_name(iteration)
    tmp, final = root / f".tmp-{name}", root / name
    steps = [(lambda: _prepare(root, tmp, final)) if rank == 0 else None,
             lambda: _write_files(tmp, rank, model_state, state, sharded),
             (lambda: _publish(root, tmp, final, iteration)) if rank == 0 else None]
    for step in steps:
        err = _attempt(step, final, root) if step is not None else None
        err = _agree(err, barrier, all_ok, final)
        if err is not None:
            if rank == 0 and tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            raise err
    if rank == 0:
        _prune(root, final, iteration, keep)
    barrier()
    return final


def _prune(root: Path, written: Path, iteration: int, keep: int) -> None:
    """Delete own checkpoints older than the one just written beyond the `keep` newest (by manifest iteration).

    Never the one just written; never a newer one (another run's, left for the run that owns it to judge);
    never a damaged one or anything not named exactly `it` + 8 digits; never through a symlink.
    """
    if keep <= 0:
        return
    older = []
    for path in _own_dirs(root):
        if path.name == written.name:
            continue
        try:
            it = _manifest(path)["iteration"]
        except (_Damaged, OSError):
            continue
        if it < iteration:
            older.append((it, path))
    for _, path in sorted(older, reverse=True)[keep - 1:]:
        try:
            shutil.rmtree(path)
        except OSError as err:
            warnings.warn(f"could not prune checkpoint {path}: {describe_os_error(err)}", stacklevel=3)


# ---- find and load --------------------------------------------------------------------------------------------
def _read_latest(root: Path, warn: bool = True) -> str | None:
    """The checkpoint name in `root/latest`, or None (with a warning when the pointer is unreadable)."""
    path = root / LATEST
    if not os.path.lexists(path):
        return None
    try:
        with os.fdopen(_open_regular(path), "rb") as fh:
            text = fh.read(64).decode("ascii", "replace").strip()
    except (_Damaged, OSError) as err:
        text, why = None, str(err)
    else:
        why = f"{path} does not hold a checkpoint name"
    if text is not None and NAME_PATTERN.fullmatch(text):
        return text
    if warn:
        warnings.warn(f"ignoring the latest pointer: {why}", stacklevel=3)
    return None


def find_latest(root: Path) -> Path | None:
    """The newest undamaged checkpoint under root; each damaged newer one is named in a warning.

    The one `latest` names comes first: checkpoints numbered above it belong to another (older) run and are
    tried only after every one below it.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    pointer = _read_latest(root)
    top = int(pointer[2:]) if pointer else None
    numbered = [(int(p.name[2:]), p) for p in _own_dirs(root)]
    ordered = sorted(numbered, key=lambda ip: (top is not None and ip[0] > top, -ip[0]))
    if pointer and not any(p.name == pointer for _, p in numbered):
        warnings.warn(f"ignoring the latest pointer: {pointer} is not a checkpoint directory", stacklevel=2)
    for _, path in ordered:
        problem = verify(path)
        if problem is None:
            return path
        warnings.warn(f"skipping damaged checkpoint {path.name}: {problem}", stacklevel=2)
    return None


def _load_pt(path: Path) -> dict:
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for crafted files, RuntimeError for torn ones
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"refusing to load {path}: {first}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"refusing to load {path}: it holds a {type(value).__name__}, not a dict")
    return value


def is_sharded(path: Path) -> bool:
    """True for a checkpoint written by a sharded engine (DCP shards instead of model.safetensors)."""
    try:
        return _manifest(Path(path)).get("format") == SHARDED
    except (_Damaged, OSError):
        return False


def load_checkpoint(path: Path, rank: int) -> tuple[dict | None, dict, dict | None]:
    """(model weights — None for a sharded checkpoint, whose shards the engine loads —, shared state, this
    rank's RNG state or None when the rank did not exist then)."""
    path = Path(path)
    problem = verify(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} cannot be used: {problem}")
    weights = None
    try:
        if not is_sharded(path):
            weights = load_file(path / "model.safetensors")
    except Exception as err:
        raise CheckpointError(f"refusing to load {path / 'model.safetensors'}: {err}") from None
    state = _load_pt(path / "state.pt")
    rng_name = f"rng-rank{rank}.pt"
    rng = _load_pt(path / rng_name) if rng_name in _manifest(path)["files"] else None
    if rng is not None and not {"torch", "numpy_keys", "numpy_rest", "python"} <= set(rng):
        raise CheckpointError(f"refusing to load {path / rng_name}: not an RNG state")
    return weights, state, rng
