"""Multi-node without a second machine: two torch elastic agents on loopback act as two nodes.

Each agent runs the command a node of the sbatch script's default mode runs (ddp_toolkit.slurm.torchrun_command,
the function render_sbatch builds that line from): `--nnodes 2`, c10d rendezvous hosted by node 0
(`is_host=1`), one worker per node. World size 2 is only reachable if both agents joined one rendezvous, and the
result must equal one node running two workers.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ddp_toolkit.slurm import torchrun_command
from tests.distributed.harness import REPO, final_weights, free_port, metrics, small_config, torchrun, write_config

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(150)]


def start_node(config, run_dir, node: int, endpoint: str) -> subprocess.Popen:
    cmd = torchrun_command(sys.executable, str(config), [f"run_dir={run_dir}"], nnodes=2, nproc_per_node=1,
                           rdzv_endpoint=endpoint, rdzv_id="loopback", is_host=int(node == 0))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_nodes_on_loopback_equal_one_node_with_two_workers(tmp_path):
    raw = small_config(tmp_path / "unused", data={"size": 150}, train={"iterations": 20, "log_every": 1},
                       optim={"lr": 0.1, "warmup": 4, "schedule": "cosine"})
    config = write_config(raw, tmp_path / "cfg.yaml")
    two_nodes, one_node = tmp_path / "two_nodes", tmp_path / "one_node"
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [start_node(config, two_nodes, node, endpoint) for node in (0, 1)]
    try:
        single = torchrun(config, 2, f"run_dir={one_node}", timeout=120)  # meanwhile, on the same machine
        outputs = [agent.communicate(timeout=120)[0] for agent in agents]
    finally:
        for agent in agents:
            agent.kill()  # a no-op for an agent that has exited
    assert single.returncode == 0, single.stderr[-3000:]
    for node, (agent, out) in enumerate(zip(agents, outputs, strict=True)):
        assert agent.returncode == 0, f"node {node}:\n{out[-3000:]}"
    rows, expected = metrics(two_nodes), metrics(one_node)
    assert [r["world_size"] for r in rows] == [2] * 20 and [r["iteration"] for r in rows] == list(range(1, 21))
    for row, ref in zip(rows, expected, strict=True):
        for key in ("iteration", "epoch", "samples_seen", "lr", "grad_accum_steps"):
            assert row[key] == ref[key], key
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-12, abs=0)
    a, b = final_weights(two_nodes), final_weights(one_node)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
