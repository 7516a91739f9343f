"""scaling.py against hand-computed values, and `ddp-toolkit plan --bandwidth` (in process, no torch needed)."""

from __future__ import annotations

import json

import pytest

from ddp_toolkit import cli, scaling


@pytest.mark.parametrize(("text", "bytes_per_s"), [("25GB/s", 25e9), ("200Gb/s", 25e9), ("1GiB/s", 2**30),
                                                   ("5e8", 5e8), (" 12.5 GB/s ", 12.5e9), ("100MB", 1e8)])
def test_parse_bandwidth(text, bytes_per_s):
    assert scaling.parse_bandwidth(text) == pytest.approx(bytes_per_s)


@pytest.mark.parametrize("text", ["", "fast", "0GB/s", "-1GB/s", "1e999", "25XB/s"])
def test_parse_bandwidth_refuses(text):
    with pytest.raises(ValueError, match="bandwidth"):
        scaling.parse_bandwidth(text)


def test_parse_size():
    assert scaling.parse_size("21MB") == 21_000_000
    assert scaling.parse_size("2MiB") == 2 * 2**20
    assert scaling.parse_size("8Mb") == 1_000_000


def test_ring_allreduce_by_hand():
    # W = 8, 1 GB at 25 GB/s, 10 µs: 2·7/8 · 0.04 s + 14 · 10 µs = 0.07 + 0.00014
    assert scaling.ring_allreduce_seconds(1e9, 8, 25e9, 10e-6) == pytest.approx(0.07014)
    # W = 1024: 2·1023/1024 · 0.04 + 2046 · 10 µs = 0.0799219 + 0.02046
    assert scaling.ring_allreduce_seconds(1e9, 1024, 25e9, 10e-6) == pytest.approx(0.0799219 + 0.02046, rel=1e-6)
    assert scaling.ring_allreduce_seconds(1e9, 1, 25e9, 10e-6) == 0


def test_estimate_and_hiding_k_by_hand():
    # 21 MB at 25 GB/s, no latency, t = 40 ms, k = 1, W = 8: c = 1.75 · 0.84 ms = 1.47 ms
    (point,) = scaling.estimate(21e6, 0.040, 25e9, latency_s=0, world_sizes=(8,))
    assert point.comm_seconds == pytest.approx(1.47e-3)
    assert point.iteration_seconds == pytest.approx(41.47e-3)
    assert point.comm_share == pytest.approx(1.47 / 41.47)
    assert point.hiding_k == 1
    # c = 100 ms, t = 10 ms, share ≤ 10 %: k ≥ 100 · 0.9 / (0.1 · 10) = 90 exactly
    assert scaling.hiding_k(0.1, 0.01, 0.1) == 90
    assert scaling.hiding_k(0.1001, 0.01, 0.1) == 91
    assert scaling.hiding_k(0.0, 0.01) == 1
    k4 = scaling.estimate(1e9, 0.1, 12.5e9, grad_accum_steps=4, latency_s=0, world_sizes=(2,))[0]
    assert k4.iteration_seconds == pytest.approx(0.4 + 0.08)  # 2·1/2 · 1 GB / 12.5 GB/s = 80 ms


def _write_run(run_dir, rows):
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{torn")


def test_from_run_reads_metrics(tmp_path):
    row = {"iteration": 10, "loss": 1.0, "grad_accum_steps": 4, "world_size": 2, "allreduce_bytes_per_iteration": 800,
           "allreduce_rounds_per_iteration": 1, "compute_seconds": 0.4, "iteration_seconds": 0.5}
    _write_run(tmp_path / "run", [{**row, "compute_seconds": 9.0}, row, {**row, "compute_seconds": 0.8}, row])
    got = scaling.from_run(tmp_path / "run")
    assert got["grad_bytes"] == 800 and got["grad_accum_steps"] == 4 and got["world_size"] == 2
    assert got["micro_step_seconds"] == pytest.approx(0.1)  # median of 0.4, 0.8, 0.4 over k = 4; first row skipped


def test_from_run_without_bytes_uses_final_weights(tmp_path):
    _write_run(tmp_path / "run", [{"iteration": 1, "loss": 1.0, "iteration_seconds": 0.2, "grad_accum_steps": 2}])
    with pytest.raises(ValueError, match="--grad-bytes"):
        scaling.from_run(tmp_path / "run")
    (tmp_path / "run" / "final").mkdir()
    (tmp_path / "run" / "final" / "model.safetensors").write_bytes(b"x" * 1234)
    got = scaling.from_run(tmp_path / "run")
    assert got["grad_bytes"] == 1234 and got["micro_step_seconds"] == pytest.approx(0.1)


def test_plan_prints_the_estimate(capsys):
    assert cli.main(["plan", "--bandwidth", "25GB/s", "--grad-bytes", "21MB", "--micro-step-ms", "40",
                     "--latency-us", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["world_size"] for p in out["points"]] == list(scaling.DEFAULT_WORLD_SIZES)
    assert out["points"][0]["comm_seconds"] == pytest.approx(1.47e-3)


def test_plan_with_config_and_estimate(capsys):
    assert cli.main(["plan", "--dataset-size", "1000", "--micro-batch-size", "8", "--grad-accum-steps", "4",
                     "--bandwidth", "25GB/s", "--grad-bytes", "1GB", "--micro-step-ms", "100", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["global_batch_size"] == 32 and info["scaling"]["grad_accum_steps"] == 4


@pytest.mark.parametrize("argv", [["--bandwidth", "25GB/s"], ["--grad-bytes", "1MB", "--dataset-size", "10",
                                                               "--micro-batch-size", "2"],
                                  ["--bandwidth", "0GB/s", "--grad-bytes", "1MB", "--micro-step-ms", "1"]])
def test_plan_refuses_incomplete_inputs(capsys, argv):
    assert cli.main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "plan" in err
