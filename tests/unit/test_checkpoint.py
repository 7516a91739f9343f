"""Checkpoints: atomic layout, damaged files detected, crafted pickles refused, RNG states round-trip."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from ddp_toolkit import checkpoint as ckpt
from ddp_toolkit.errors import RunError
from tests.unit.test_rundir import remount_read_only, small_tmpfs_fixture  # noqa: F401 (fixture small_tmpfs)


def _save(root, iteration, value=1.0):
    return ckpt.save_checkpoint(root, iteration, model_state={"w": torch.full((3,), value)},
                                state={"progress": {"iteration": iteration}}, rank=0, barrier=lambda: None, keep=3)


def test_save_load_round_trip_and_latest_pointer(tmp_path):
    _save(tmp_path, 5, 1.0)
    path = _save(tmp_path, 10, 2.0)
    assert (tmp_path / "latest").read_text().strip() == "it00000010"
    assert not list(tmp_path.glob(".tmp-*"))
    weights, state, rng = ckpt.load_checkpoint(path, rank=0)
    assert torch.equal(weights["w"], torch.full((3,), 2.0)) and state["progress"]["iteration"] == 10
    assert rng is not None and ckpt.load_checkpoint(path, rank=1)[2] is None
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "state.pt", "rng-rank0.pt"}


def test_keep_prunes_old_checkpoints(tmp_path):
    for it in (1, 2, 3, 4):
        _save(tmp_path, it)
    assert sorted(p.name for p in tmp_path.glob("it*")) == ["it00000002", "it00000003", "it00000004"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_damaged_newest_checkpoint_falls_back_with_warning(tmp_path, damage):
    _save(tmp_path, 5)
    newest = _save(tmp_path, 10)
    target = newest / "model.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:10])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete":
        target.unlink()
    else:
        (newest / "manifest.json").unlink()  # a crash before the manifest: never renamed in practice
    with pytest.warns(UserWarning, match="skipping damaged checkpoint it00000010"):
        assert ckpt.find_latest(tmp_path).name == "it00000005"
    with pytest.raises(ckpt.CheckpointError, match="it00000010"):
        ckpt.load_checkpoint(newest, rank=0)


def test_unfinished_temporary_checkpoint_is_ignored(tmp_path):
    _save(tmp_path, 5)
    (tmp_path / ".tmp-it00000010").mkdir()
    assert ckpt.find_latest(tmp_path).name == "it00000005"


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_crafted_pickle_is_refused_and_never_runs(tmp_path):
    path = _save(tmp_path, 5)
    marker = tmp_path / "pwned"
    torch.save({"progress": _Evil(marker)}, path / "state.pt")
    ckpt._write_manifest(path, 5)  # the attacker also fixes the manifest: the loader must still refuse
    with pytest.raises(ckpt.CheckpointError, match="refusing to load"):
        ckpt.load_checkpoint(path, rank=0)
    assert not marker.exists()


def test_rng_state_round_trip():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = ckpt.rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    ckpt.set_rng_state(state)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


# ---- pruning and resume touch only their own files -----------------------------------------------------------
def _save_keep(root, iteration, keep=2, **kw):
    return ckpt.save_checkpoint(root, iteration, model_state={"w": torch.ones(3)},
                                state={"progress": {"iteration": iteration}, "fingerprint": {"seed": 0}},
                                rank=0, barrier=lambda: None, keep=keep, **kw)


def _names(root):
    return sorted(p.name for p in root.iterdir())


def test_pruning_leaves_foreign_names_backups_and_symlinks_alone(tmp_path):
    outside = tmp_path / "outside"
    _save_keep(outside, 3)
    root = tmp_path / "checkpoints"
    _save_keep(root, 1)
    backup = root / "it00000010_best"
    backup.mkdir()
    (backup / "model.safetensors").write_text("user's copy")
    (root / "it_notes").mkdir()
    (root / "it00000002").symlink_to(outside / "it00000003")
    for it in (5, 10, 15):
        _save_keep(root, it)
    assert _names(root) == ["it00000002", "it00000010", "it00000010_best", "it00000015", "it_notes", "latest"]
    assert (backup / "model.safetensors").read_text() == "user's copy"
    assert ckpt.verify(outside / "it00000003") is None  # the symlink's target was never touched


def test_just_written_checkpoint_survives_higher_numbers_of_an_older_run(tmp_path):
    for it in (15, 20):
        _save_keep(tmp_path, it)
    first = _save_keep(tmp_path, 5, keep=1)
    written = _save_keep(tmp_path, 10, keep=1)
    assert written.is_dir() and not first.exists()
    assert _names(tmp_path) == ["it00000010", "it00000015", "it00000020", "latest"]
    assert (tmp_path / "latest").read_text().strip() == "it00000010"
    assert ckpt.find_latest(tmp_path) == written  # the pointer names this run's newest, not the older run's


def test_rewriting_the_same_iteration_replaces_it_whole(tmp_path):
    _save_keep(tmp_path, 5)
    again = ckpt.save_checkpoint(tmp_path, 5, model_state={"w": torch.zeros(3)}, state={}, rank=0,
                                 barrier=lambda: None)
    assert torch.equal(ckpt.load_checkpoint(again, 0)[0]["w"], torch.zeros(3))
    assert _names(tmp_path) == ["it00000005", "latest"]


def test_a_file_in_place_of_the_checkpoint_name_is_refused_and_kept(tmp_path):
    _save_keep(tmp_path, 5)
    (tmp_path / "it00000010").write_text("a user's file")
    with pytest.raises(ckpt.CheckpointWriteError, match="it00000010: that name is taken"):
        _save_keep(tmp_path, 10)
    assert (tmp_path / "it00000010").read_text() == "a user's file" and not list(tmp_path.glob(".tmp-*"))


def _rewrite_manifest(path, edit):
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps(edit(manifest)))


def _add_file(name, meta):
    def edit(m):
        m["files"][name] = meta
        return m
    return edit


_META = {"bytes": 0, "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink", "fifo", "list", "no-files", "iteration-text",
                                  "bad-meta", "wrong-iteration", "not-json", "manifest-symlink"])
def test_manifest_of_the_wrong_shape_is_a_damaged_checkpoint(tmp_path, case):
    root = tmp_path / "checkpoints"
    _save_keep(root, 5)
    newest = _save_keep(root, 10)
    secret = tmp_path / "x"
    secret.write_bytes(b"")
    if case == "dotdot":
        _rewrite_manifest(newest, _add_file("../../x", _META))
    elif case == "absolute":
        _rewrite_manifest(newest, _add_file(str(secret), _META))
    elif case == "symlink":
        (newest / "extra").symlink_to(secret)
        _rewrite_manifest(newest, _add_file("extra", _META))
    elif case == "fifo":  # reading it would block forever
        os.mkfifo(newest / "extra")
        _rewrite_manifest(newest, _add_file("extra", _META))
    elif case == "list":
        _rewrite_manifest(newest, lambda m: [m])
    elif case == "no-files":
        _rewrite_manifest(newest, lambda m: {"iteration": 10, "files": {}})
    elif case == "iteration-text":
        _rewrite_manifest(newest, lambda m: {**m, "iteration": "10"})
    elif case == "bad-meta":
        _rewrite_manifest(newest, lambda m: {**m, "files": {**m["files"], "state.pt": {"bytes": "1"}}})
    elif case == "wrong-iteration":
        _rewrite_manifest(newest, lambda m: {**m, "iteration": 99})
    elif case == "not-json":
        (newest / "manifest.json").write_text('{"iteration": 10, "fi')
    else:
        real = tmp_path / "manifest.json"
        real.write_text((newest / "manifest.json").read_text())
        (newest / "manifest.json").unlink()
        (newest / "manifest.json").symlink_to(real)
    with pytest.warns(UserWarning, match="skipping damaged checkpoint it00000010"):
        assert ckpt.find_latest(root).name == "it00000005"
    with pytest.raises(ckpt.CheckpointError, match="it00000010"):
        ckpt.load_checkpoint(newest, rank=0)
    _save_keep(root, 15, keep=1)
    assert secret.exists() and secret.read_bytes() == b""
    if case not in ("symlink", "fifo"):  # the manifest is sound there: an ordinary old checkpoint, pruned
        assert newest.exists()  # a manifest that cannot be read is not provably ours to delete


def test_symlinked_checkpoint_directory_is_never_resumed_from(tmp_path):
    elsewhere = _save_keep(tmp_path / "elsewhere", 50)
    root = tmp_path / "checkpoints"
    _save_keep(root, 5)
    (root / "it00000050").symlink_to(elsewhere)
    (root / "latest").write_text("it00000050\n")
    with pytest.warns(UserWarning, match="it00000050 is not a checkpoint directory"):
        assert ckpt.find_latest(root).name == "it00000005"


@pytest.mark.parametrize("pointer", ["../../etc/passwd\n", "", "it5\n"])
def test_meaningless_latest_pointer_is_ignored_with_a_warning(tmp_path, pointer):
    _save_keep(tmp_path, 5)
    _save_keep(tmp_path, 10)
    (tmp_path / "latest").write_text(pointer)
    with pytest.warns(UserWarning, match="ignoring the latest pointer"):
        assert ckpt.find_latest(tmp_path).name == "it00000010"


def test_state_or_rng_of_the_wrong_shape_is_an_error_not_a_traceback(tmp_path):
    path = _save_keep(tmp_path, 5)
    torch.save([1, 2, 3], path / "state.pt")
    ckpt._write_manifest(path, 5)
    with pytest.raises(ckpt.CheckpointError, match="holds a list, not a dict"):
        ckpt.load_checkpoint(path, rank=0)
    with pytest.raises(ckpt.CheckpointError, match="wrong shape"):
        ckpt.set_rng_state({"torch": torch.zeros(3)})


# ---- write errors ------------------------------------------------------------------------------------------------
def _big(n):
    return {"w": torch.zeros(n)}


def _assert_previous_intact(root, error):
    message = str(error)
    assert "\n" not in message and "previous checkpoint: it00000005 (intact)" in message
    assert error.exit_code == 1 and isinstance(error, RunError)
    assert ckpt.find_latest(root).name == "it00000005" and ckpt.verify(root / "it00000005") is None
    assert (root / "latest").read_text().strip() == "it00000005"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_disk_full_is_one_line_and_keeps_the_previous_checkpoint(small_tmpfs):
    root = small_tmpfs("512k") / "checkpoints"
    _save_keep(root, 5)
    with pytest.raises(ckpt.CheckpointWriteError, match=f"cannot write checkpoint {root / 'it00000010'}.*"
                                                        f"No space left on device") as err:
        ckpt.save_checkpoint(root, 10, model_state=_big(200_000), state={}, rank=0, barrier=lambda: None)
    _assert_previous_intact(root, err.value)


def test_read_only_checkpoint_folder_is_one_line_and_keeps_the_previous_checkpoint(small_tmpfs):
    point = small_tmpfs()
    _save_keep(point, 5)
    remount_read_only(point)
    with pytest.raises(ckpt.CheckpointWriteError, match="Read-only file system") as err:
        _save_keep(point, 10)
    assert "\n" not in str(err.value) and ckpt.find_latest(point).name == "it00000005"


def test_permission_error_names_the_file(tmp_path, monkeypatch):
    _save_keep(tmp_path, 5)

    def denied(tensors, path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(ckpt, "save_file", denied)
    with pytest.raises(ckpt.CheckpointWriteError, match=r"model.safetensors\): Permission denied \(EACCES\)") as err:
        _save_keep(tmp_path, 10)
    _assert_previous_intact(tmp_path, err.value)


def test_failure_on_another_rank_is_raised_everywhere_with_all_ok(tmp_path):
    _save_keep(tmp_path, 5)
    with pytest.raises(ckpt.CheckpointWriteError, match="failed on another rank"):
        _save_keep(tmp_path, 10, all_ok=lambda ok: False)
    assert ckpt.find_latest(tmp_path).name == "it00000005" and not list(tmp_path.glob(".tmp-*"))
