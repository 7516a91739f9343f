"""Report files on a real disk: torn metrics lines cut with one warning, outputs replaced atomically, disk full."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import pytest
import torch

from ddp_toolkit.errors import InputError, RunError
from ddp_toolkit.report import report_run, write_plots
from ddp_toolkit.reporting import Reporter, read_metrics, write_final_weights
from tests.unit.test_rundir import link_out, small_tmpfs_fixture  # noqa: F401 (fixture small_tmpfs)


def _reporter(run_dir) -> Reporter:
    cfg = SimpleNamespace(run_dir=str(run_dir), report=SimpleNamespace(jsonl=True, console=False, wandb=False))
    return Reporter(cfg, env=None, plan=None)


def _row(it: int, kind: str = "train") -> dict:
    return {"kind": kind, "iteration": it, "epoch": it / 4, "samples_seen": 8 * it, "loss": 1.0 / it, "lr": 0.1,
            "global_batch_size": 8}


def _write_rows(path, rows, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


@pytest.mark.parametrize("tail", ['{"kind": "train", "itera', "42\n", '[1, 2]\n', '{"iteration": "x"}\n',
                                  "\x00\x00\x00"])
def test_truncate_after_cuts_a_torn_last_line_with_one_warning(tmp_path, capsys, tail):
    path = tmp_path / "metrics.jsonl"
    _write_rows(path, [_row(i) for i in (1, 2, 3)], tail)
    inode = path.stat().st_ino
    _reporter(tmp_path).truncate_after(2)
    warned = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(warned) == 1 and "metrics.jsonl: cut line 4" in warned[0]
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [1, 2]
    assert path.stat().st_ino != inode  # replaced, not edited in place


def test_truncate_after_names_every_bad_line_in_one_warning_and_ends_the_file_cleanly(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(_row(1)) + "\n{oops\n" + json.dumps(_row(2)) + "\n[]\n" + json.dumps(_row(3)))
    reporter = _reporter(tmp_path)
    reporter.truncate_after(10)
    assert capsys.readouterr().err.count("warning:") == 1
    reporter.log({**_row(4), "loss": 0.5})
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_clean_file_gives_no_warning(tmp_path, capsys):
    _write_rows(tmp_path / "metrics.jsonl", [_row(1), _row(2)])
    _reporter(tmp_path).truncate_after(1)
    assert capsys.readouterr().err == ""
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_read_metrics_skips_a_torn_line_with_one_warning(tmp_path):
    _write_rows(tmp_path / "metrics.jsonl", [_row(1), _row(2, "eval")], '{"kind": "tr')
    with pytest.warns(UserWarning, match="ignoring line 3") as caught:
        train, evals = read_metrics(tmp_path)
    assert len(caught) == 1 and [r["iteration"] for r in train] == [1] and len(evals) == 1
    with pytest.raises(InputError, match="cannot read"):
        read_metrics(tmp_path / "absent")


def test_outputs_replace_symlinks_instead_of_writing_through_them(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    for name in ("summary.json", "loss_vs_iteration.png"):
        (outside / name).write_text("keep")
        (run / name).symlink_to(outside / name)
    _write_rows(run / "metrics.jsonl", [_row(i) for i in range(1, 9)])
    _reporter(run).finish({"iterations": 8})
    paths = write_plots(run)
    for name in ("summary.json", "loss_vs_iteration.png"):
        assert not (run / name).is_symlink() and (outside / name).read_text() == "keep"
    assert json.loads((run / "summary.json").read_text()) == {"iterations": 8} and len(paths) == 3
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_metrics_symlink_is_refused_not_appended_through(tmp_path):
    outside, _ = link_out(tmp_path, "metrics.jsonl", "")
    with pytest.raises(RunError, match="symbolic link"):
        _reporter(tmp_path / "run").log(_row(1))
    assert outside.read_text() == ""


def test_torn_summary_falls_back_to_metrics(tmp_path, capsys):
    _write_rows(tmp_path / "metrics.jsonl", [_row(i) for i in range(1, 5)])
    (tmp_path / "summary.json").write_text('{"iterat')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report_run(tmp_path)
    assert any("summary.json" in str(w.message) for w in caught)
    assert "run unfinished" in capsys.readouterr().out


def test_disk_full_during_metrics_leaves_no_torn_line_for_the_next_run(small_tmpfs, capsys):
    run = small_tmpfs("64k")
    (run / "filler").write_bytes(b"x" * 32_000)
    reporter = _reporter(run)
    with pytest.raises(RunError, match=f"cannot append to {run / 'metrics.jsonl'}: No space left") as err:
        for it in range(1, 10_000):
            reporter.log({**_row(it), "padding": "x" * 500})
    assert "\n" not in str(err.value)
    (run / "filler").unlink()  # the user frees space and runs again
    _reporter(run).truncate_after(10_000)
    assert capsys.readouterr().err == ""  # nothing torn: every line that was written is whole


def test_disk_full_writing_final_weights_is_one_line(small_tmpfs):
    run = small_tmpfs("128k")
    with pytest.raises(RunError, match=f"cannot write {run / 'final' / 'model.safetensors'}: No space left"):
        write_final_weights(run, {"w": torch.zeros(100_000)})
    assert list((run / "final").iterdir()) == []
    path = write_final_weights(run, {"w": torch.ones(10)})
    assert path == run / "final" / "model.safetensors" and path.stat().st_size > 40
