"""The run directory: one run at a time (real processes), writable up front, an old run moved aside, safe writes."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import subprocess
import threading

import pytest

from ddp_toolkit.errors import EXIT_INPUT, InputError, RunError
from ddp_toolkit.rundir import (
    RunDirBusy,
    RunDirLock,
    RunDirUnwritable,
    append_line,
    archive_previous_run,
    atomic_write,
    check_writable,
)


@pytest.fixture(name="small_tmpfs")
def small_tmpfs_fixture(tmp_path):
    """mount(size) → a fresh tmpfs of that size under tmp_path (skips only if this machine cannot mount one)."""
    mounted = []

    def mount(size: str = "256k"):
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def remount_read_only(point) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)


def link_out(tmp_path, name: str, content: str = "keep"):
    """(outside file holding `content`, tmp_path/run/name: a symlink to it leading out of the run dir)."""
    outside = tmp_path / f"outside-{name}"
    outside.write_text(content)
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / name).symlink_to(outside)
    return outside, tmp_path / "run" / name


# ---- the lock -------------------------------------------------------------------------------------------------
def _hold_lock(run_dir, ready) -> None:
    RunDirLock(run_dir).acquire()
    ready.set()
    signal.pause()


def test_second_process_is_refused_naming_the_holder_until_the_holder_is_killed(tmp_path):
    run_dir = tmp_path / "run"
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(run_dir, ready), daemon=True)
    holder.start()
    try:
        assert ready.wait(30), "the holder never took the lock"
        with pytest.raises(RunDirBusy) as refused:
            RunDirLock(run_dir).acquire()
        message = str(refused.value)
        assert f"pid {holder.pid} on {socket.gethostname()}" in message and str(run_dir) in message
        assert "\n" not in message and refused.value.exit_code == EXIT_INPUT
        assert RunDirLock(run_dir, rank=1).acquire().held is False  # another rank of the same run: not refused
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(30)
    with RunDirLock(run_dir) as lock:  # the kernel freed the dead holder's lock: no stale-lock cleanup needed
        assert lock.held and lock.holder()["pid"] == os.getpid()


def _hold_lock_and_fork(run_dir, queue) -> None:
    RunDirLock(run_dir).acquire()
    worker = os.fork()  # like a data-loader worker: it shares the open lock file, and so the lock
    if worker == 0:
        signal.pause()
        os._exit(0)
    queue.put(worker)
    signal.pause()


def test_lock_left_to_a_forked_worker_of_a_dead_holder_is_waited_for(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    holder = ctx.Process(target=_hold_lock_and_fork, args=(tmp_path, queue), daemon=True)
    holder.start()
    worker = queue.get(timeout=30)
    os.kill(holder.pid, signal.SIGKILL)
    os.waitpid(holder.pid, 0)  # reaped (join would wait for the worker, which shares the process's sentinel pipe)
    try:
        with pytest.raises(RunDirBusy, match=f"pid {holder.pid} .* it has exited but a process it started"):
            RunDirLock(tmp_path).acquire(grace_s=0.3)
        threading.Timer(0.5, os.kill, (worker, signal.SIGKILL)).start()
        assert RunDirLock(tmp_path).acquire(grace_s=30).held
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)


def test_lock_released_on_exit_and_reacquired(tmp_path):
    with RunDirLock(tmp_path) as first:
        assert first.held
        with pytest.raises(RunDirBusy, match=f"pid {os.getpid()}"):
            RunDirLock(tmp_path).acquire()
    assert not first.held
    second = RunDirLock(tmp_path).acquire()
    second.release()
    second.release()  # twice is harmless
    assert (tmp_path / ".lock").read_text() == ""


def test_lock_refuses_a_symlink_in_place_of_the_lock_file(tmp_path):
    outside, _ = link_out(tmp_path, ".lock")
    with pytest.raises(RunDirUnwritable, match="lock file"):
        RunDirLock(tmp_path / "run").acquire()
    assert outside.read_text() == "keep"


# ---- writable before training -----------------------------------------------------------------------------------
def test_check_writable_creates_the_output_folders(tmp_path):
    check_writable(tmp_path / "a" / "run")
    assert (tmp_path / "a" / "run" / "checkpoints").is_dir() and (tmp_path / "a" / "run" / "final").is_dir()
    assert not [p for p in (tmp_path / "a" / "run").rglob(".write-probe-*")]


def test_check_writable_names_a_file_in_place_of_a_folder(tmp_path):
    (tmp_path / "checkpoints").write_text("not a folder")
    with pytest.raises(RunDirUnwritable, match=f"{tmp_path / 'checkpoints'}") as err:
        check_writable(tmp_path)
    assert isinstance(err.value, InputError) and "\n" not in str(err.value)


def test_read_only_run_dir_is_detected_up_front(small_tmpfs, tmp_path):
    point = small_tmpfs()
    remount_read_only(point)
    with pytest.raises(RunDirUnwritable, match=f"cannot write into {point}: Read-only file system"):
        check_writable(point)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(point)  # checkpoints on another (read-only) disk
    with pytest.raises(RunDirUnwritable, match=f"cannot write into {run / 'checkpoints'}: Read-only"):
        check_writable(run)


# ---- a fresh run moves the old one aside -------------------------------------------------------------------------
def test_archive_moves_outputs_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "it00000020").mkdir(parents=True)
    (run / "final").mkdir()  # empty: what check_writable makes, stays
    (run / "metrics.jsonl").write_text('{"iteration": 1}\n')
    (run / "summary.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    (run / ".lock").write_text("")
    outside, _ = link_out(tmp_path, "plan.json", "theirs")
    moved = archive_previous_run(run)
    dest = moved[0].parent
    assert dest.parent == run / "previous"
    assert sorted(p.name for p in moved) == ["checkpoints", "metrics.jsonl", "plan.json", "summary.json"]
    assert (dest / "checkpoints" / "it00000020").is_dir() and (dest / "plan.json").is_symlink()
    assert outside.read_text() == "theirs" and (run / "notes.txt").read_text() == "mine"
    assert (run / ".lock").exists() and (run / "final").is_dir() and not (run / "metrics.jsonl").exists()
    (run / "metrics.jsonl").write_text("{}\n")
    again = archive_previous_run(run)
    assert again[0].parent != dest and (dest / "metrics.jsonl").read_text() == '{"iteration": 1}\n'
    assert archive_previous_run(run) == [] and archive_previous_run(tmp_path / "absent") == []


# ---- atomic writes and appends --------------------------------------------------------------------------------
def test_atomic_write_replaces_a_symlink_instead_of_writing_through_it(tmp_path):
    outside, link = link_out(tmp_path, "summary.json")
    atomic_write(link, "new")
    assert not link.is_symlink() and link.read_text() == "new" and outside.read_text() == "keep"


def test_append_refuses_a_symlink(tmp_path):
    outside, link = link_out(tmp_path, "metrics.jsonl", "")
    with pytest.raises(RunError, match="metrics.jsonl: it is a symbolic link"):
        append_line(link, "{}")
    assert outside.read_text() == ""


def test_disk_full_is_one_line_and_leaves_no_partial_write(small_tmpfs):
    point = small_tmpfs("64k")
    log = point / "metrics.jsonl"
    line = '{"iteration": 1, "padding": "' + "x" * 1000 + '"}'
    with pytest.raises(RunError, match=f"cannot append to {log}: No space left on device") as err:
        for _ in range(1000):
            append_line(log, line)
    assert "\n" not in str(err.value)
    assert all(row == line for row in log.read_text().splitlines()) and log.read_text().endswith("\n")
    with pytest.raises(RunError, match=f"cannot write {point / 'big.bin'}: No space left"):
        atomic_write(point / "big.bin", b"x" * 200_000)
    assert not [p for p in point.iterdir() if p.name.startswith(".big.bin")]
