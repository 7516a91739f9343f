"""Rendered sbatch text, node-list expansion, the port formula, the Slurm command wrappers and the
`ddp-toolkit slurm` commands (with fake Slurm commands).

The expected scripts in tests/unit/expected/ are committed text: after a deliberate change to
render_sbatch, regenerate them by hand and review the diff.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ddp_toolkit.cli import main as cli_main
from ddp_toolkit.slurm import (
    SlurmError,
    expand_nodelist,
    job_state,
    master_port_for_job,
    render_sbatch,
    torchrun_command,
    write_and_submit,
)

EXPECTED = Path(__file__).parent / "expected"
BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None, reason="bash not found")

CASES = {
    "single_node": dict(
        job_name="tiny", run_dir="runs/tiny", config_path="configs/tiny.yaml",
        overrides=("train.max_iterations=50",), nproc_per_node=2, time="00:30:00",
    ),
    "multi_node": dict(
        job_name="gpt-small", run_dir="/scratch/alice/runs/gpt-small", config_path="configs/gpt_small.yaml",
        overrides=("optim.lr=3e-4", "run.name=gpt small $USER"), nodes=4, gpus_per_node=8,
        partition="gpu", account="proj42", cpus_per_task=32, mem="480G", time="24:00:00",
        extra_sbatch=("--exclusive",),
    ),
    "task_per_gpu": dict(
        job_name="gpt-small", run_dir="/scratch/alice/runs/gpt-small", config_path="configs/gpt_small.yaml",
        nodes=2, gpus_per_node=4, mode="task-per-gpu", python=".venv/bin/python", requeue=False,
    ),
}


def srun_command(script: str) -> str:
    """The srun command line of a rendered script (backslash continuations kept), without the `&`."""
    block = re.search(r"^srun .*?&$", script, flags=re.M | re.S)
    assert block, "no srun line ending in '&' found"
    return block.group(0)[:-1].rstrip()


# ---------------------------------------------------------------------------------------------------
# Rendered text


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_script_matches_expected_file(name: str) -> None:
    expected_path = EXPECTED / f"{name}.sbatch"
    assert expected_path.exists(), f"missing {expected_path}: write it by hand from render_sbatch and review"
    expected = expected_path.read_text()
    actual = render_sbatch(**CASES[name])
    diff = "".join(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True),
                                        str(expected_path), "render_sbatch(...)"))
    assert actual == expected, f"rendered script differs from the expected file:\n{diff}"


@needs_bash
@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_script_is_valid_bash(name: str) -> None:
    script = render_sbatch(**CASES[name])
    for text in (script, srun_command(script)):
        proc = subprocess.run([BASH, "-n"], input=text, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_default_mode_escapes_every_compute_node_variable() -> None:
    script = render_sbatch(**CASES["multi_node"])
    srun = srun_command(script)
    inner = srun[srun.index('bash -c "') + len('bash -c "'):]
    assert "\\$SLURM_NODEID" in inner and "\\$SLURM_JOB_NUM_NODES" in inner
    assert "\\$MASTER_ADDR:\\$MASTER_PORT" in inner
    unescaped = [m.start() for m in re.finditer(r"(?<!\\)\$", inner)]
    assert not unescaped, f"'$' expanded by the batch shell at {unescaped} in {inner!r}"
    assert "SLURM_PROCID" not in script  # ranks come from torchrun in this mode


def _run_srun_with_shim(script: str, node_id: int, tmp_path: Path) -> list[str]:
    """Run the srun line in bash, with srun replaced by a shim that plays one compute node.

    The batch shell sees decoy values; the shim sets the compute node's values. If a variable were
    expanded by the batch shell, its decoy would show up in the arguments.
    """
    shim = (
        'srun() { while [ "${1#--}" != "$1" ]; do shift; done; '
        f"SLURM_NODEID={node_id} SLURM_JOB_NUM_NODES=4 MASTER_ADDR=gpu01 MASTER_PORT=20042 "
        'SLURM_JOB_ID=42 "$@"; }\n'
    )
    decoys = {"SLURM_NODEID": "99", "SLURM_JOB_NUM_NODES": "111", "MASTER_ADDR": "decoy",
              "MASTER_PORT": "1", "SLURM_JOB_ID": "7", "USER": "alice", "PATH": os.environ["PATH"]}
    proc = subprocess.run([BASH, "-c", shim + srun_command(script)], env=decoys, cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


@needs_bash
@pytest.mark.parametrize(("node_id", "is_host"), [(0, "1"), (3, "0")])
def test_default_mode_arguments_as_the_compute_node_sees_them(
    node_id: int, is_host: str, tmp_path: Path
) -> None:
    fake_python = tmp_path / "fake-python"
    fake_python.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    fake_python.chmod(0o755)
    script = render_sbatch(**{**CASES["multi_node"], "python": str(fake_python)})
    args = _run_srun_with_shim(script, node_id, tmp_path)
    assert args == [
        "-m", "torch.distributed.run", "--nnodes", "4", "--nproc-per-node", "8",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "gpu01:20042", "--rdzv-id", "42",
        "--rdzv-conf", f"is_host={is_host}",
        "launch/train.py", "configs/gpt_small.yaml", "optim.lr=3e-4", "run.name=gpt small $USER",
        "train.resume=auto",
    ]


@needs_bash
@pytest.mark.parametrize("node_id", [0, 3])
def test_default_mode_runs_torchrun_command_on_every_node(node_id: int, tmp_path: Path) -> None:
    """The shared command builder (also used by the loopback multi-node test) is what the script runs."""
    fake_python = tmp_path / "fake-python"
    fake_python.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    fake_python.chmod(0o755)
    case = CASES["multi_node"]
    args = _run_srun_with_shim(render_sbatch(**{**case, "python": str(fake_python)}), node_id, tmp_path)
    expected = torchrun_command(str(fake_python), case["config_path"], case["overrides"], nnodes=4,
                                nproc_per_node=8, rdzv_endpoint="gpu01:20042", rdzv_id=42,
                                is_host=int(node_id == 0))
    assert args == expected[1:]


def test_resume_override_is_not_duplicated() -> None:
    script = render_sbatch(job_name="j", run_dir="r", config_path="c.yaml", overrides=["train.resume=never"])
    assert "train.resume=never" in script and "train.resume=auto" not in script


def test_nproc_defaults_to_gpus_per_node_and_cpus_are_repeated_for_srun() -> None:
    script = render_sbatch(job_name="j", run_dir="r", config_path="c.yaml", gpus_per_node=4, cpus_per_task=16)
    assert "--nproc-per-node 4 " in script
    assert "#SBATCH --cpus-per-task=16" in script and "srun --ntasks-per-node=1 --cpus-per-task=16 " in script


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"signal": "USR1@90"}, "B:"),
        ({"signal": "R:USR1"}, "B:"),
        ({"nodes": 0}, "nodes=0"),
        ({"nproc_per_node": 0}, "nproc_per_node=0"),
        ({"gpus_per_node": -1}, "gpus_per_node=-1"),
        ({"job_name": "a\nb"}, "line break"),
        ({"overrides": ["x=1\n#SBATCH --nodes=9"]}, "line break"),
        ({"mode": "mpi"}, "mode"),
    ],
)
def test_render_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    base = dict(job_name="j", run_dir="r", config_path="c.yaml")
    with pytest.raises(ValueError, match=re.escape(message)):
        render_sbatch(**{**base, **kwargs})


def test_signal_can_be_disabled_and_accepts_sig_prefix() -> None:
    base = dict(job_name="j", run_dir="r", config_path="c.yaml")
    assert "--signal" not in render_sbatch(**base, signal=None)
    assert "trap on_warning USR2" in render_sbatch(**base, signal="B:SIGUSR2@120")
    assert "trap on_warning USR1" in render_sbatch(**base, signal="B:usr1")


# ---------------------------------------------------------------------------------------------------
# Node lists and ports


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node1", ["node1"]),
        ("a,b,c", ["a", "b", "c"]),
        ("gpu[01-04,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu5"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("n[008-010]", ["n008", "n009", "n010"]),
        ("n[3]", ["n3"]),
        ("rack[1-2]-gpu[3-4]", ["rack1-gpu3", "rack1-gpu4", "rack2-gpu3", "rack2-gpu4"]),
        ("x[1,3],y[01-02],z", ["x1", "x3", "y01", "y02", "z"]),
        ("node-a[1-2].cluster", ["node-a1.cluster", "node-a2.cluster"]),
        (" gpu[1-2] ", ["gpu1", "gpu2"]),
    ],
)
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu[1-2", "gpu1-2]", "gpu[2-1]", "gpu[a-b]", "a,,b", "gpu[[1]]", ""])
def test_expand_nodelist_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError, match="node list"):
        expand_nodelist(bad)


@needs_bash
@pytest.mark.parametrize("job_id", [0, 1, 42, 9999, 10000, 123456, 2**31 - 1])
def test_master_port_matches_the_formula_in_the_script(job_id: int) -> None:
    script = render_sbatch(job_name="j", run_dir="r", config_path="c.yaml")
    (line,) = [x for x in script.splitlines() if x.startswith("export MASTER_PORT=")]
    proc = subprocess.run([BASH, "-c", f'{line}; echo "$MASTER_PORT"'], capture_output=True, text=True,
                          env={"SLURM_JOB_ID": str(job_id)}, check=True)
    assert int(proc.stdout) == master_port_for_job(job_id)
    assert 20000 <= master_port_for_job(job_id) < 30000


# ---------------------------------------------------------------------------------------------------
# Command wrappers, with fake Slurm commands on PATH


def _fake_command(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


@needs_bash
def test_write_and_submit_writes_the_script_and_parses_the_job_id(tmp_path: Path, monkeypatch) -> None:
    _fake_command(tmp_path, "sbatch", 'cat "$2" > "$(dirname "$2")/seen"; echo "123;ddptest"')
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    run_dir = tmp_path / "runs" / "a"
    assert write_and_submit("#!/bin/bash\ntrue\n", run_dir) == 123
    assert (run_dir / "job.sbatch").read_text() == (run_dir / "seen").read_text() == "#!/bin/bash\ntrue\n"


@needs_bash
def test_submit_errors_are_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch at all
    with pytest.raises(SlurmError, match="sbatch not found") as missing:
        write_and_submit("#!/bin/bash\n", tmp_path / "r")
    _fake_command(tmp_path, "sbatch", "echo 'sbatch: error: Batch job submission failed: x' >&2; exit 1")
    with pytest.raises(SlurmError, match="exit code 1: sbatch: error: Batch job submission failed") as failed:
        write_and_submit("#!/bin/bash\n", tmp_path / "r")
    assert "\n" not in str(missing.value) and "\n" not in str(failed.value)


@needs_bash
def test_job_state_parses_scontrol_one_liner(tmp_path: Path, monkeypatch) -> None:
    line = ("JobId=7 JobName=my job UserId=root(0) JobState=RUNNING Reason=None Requeue=1 Restarts=2 "
            "BatchFlag=1 ExitCode=0:0 TRES=cpu=2,node=1,billing=2 NodeList=gpu[01-02] StdOut=/r/slurm-7.out")
    _fake_command(tmp_path, "scontrol", f"echo '{line}'")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    state = job_state(7)
    assert state["JobName"] == "my job" and state["JobState"] == "RUNNING"
    assert state["Restarts"] == "2" and state["ExitCode"] == "0:0"
    assert state["TRES"] == "cpu=2,node=1,billing=2" and state["NodeList"] == "gpu[01-02]"


# ---------------------------------------------------------------------------------------------------
# `ddp-toolkit slurm submit | status | cancel`, with fake Slurm commands on PATH

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "data": {"name": "synthetic", "size": 64, "eval_size": 0, "features": 4, "classes": 2},
    "model": {"name": "linear"},
    "batch": {"micro_batch_size": 4, "global_batch_size": 32},
    "train": {"iterations": 3},
}


@pytest.fixture
def tiny_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A small config in tmp_path; the command runs from the repository root, as it must."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    monkeypatch.chdir(REPO)
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_dry_run_prints_the_rendered_script(tiny_config: Path, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "runs" / "tiny run"
    code, out, err = run_cli(capsys, "slurm", "submit", str(tiny_config), "--nodes", "2", "--gpus-per-node", "4",
                             "train.iterations=5", "--time", "01:00:00", "--dry-run", f"run_dir={run_dir}")
    assert code == 0, err
    assert out == render_sbatch(
        job_name="tiny-run", run_dir=str(run_dir), config_path=str(run_dir / "job.yaml"),
        overrides=["train.iterations=5", f"run_dir={run_dir}"], nodes=2, gpus_per_node=4, nproc_per_node=4,
        time="01:00:00", python=sys.executable)
    assert not run_dir.exists()  # a dry run writes nothing


def test_cli_cpu_job_defaults_to_one_worker_per_node_and_says_so(tiny_config: Path, capsys) -> None:
    code, out, err = run_cli(capsys, "slurm", "submit", str(tiny_config), "--mode", "task-per-gpu", "--dry-run")
    assert code == 0 and "1 CPU worker per node" in err
    assert "#SBATCH --ntasks-per-node=1" in out and "--gpus-per-node" not in out


def test_cli_submit_writes_script_and_config_copy_and_prints_the_job_id(
    tiny_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_command(bin_dir, "sbatch", 'echo "$@" > "$(dirname "$2")/sbatch-args"; echo "42;ddptest"')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "slurm", "submit", str(tiny_config), "--nproc-per-node", "2",
                             f"run_dir={run_dir}")
    assert (code, out) == (0, "42\n"), err
    assert "submitted job 42" in err
    assert (run_dir / "sbatch-args").read_text().split() == ["--parsable", str(run_dir / "job.sbatch")]
    assert (run_dir / "job.yaml").read_text() == tiny_config.read_text()
    assert f"launch/train.py {run_dir / 'job.yaml'} run_dir={run_dir}" in (run_dir / "job.sbatch").read_text()


@pytest.mark.parametrize(("argv", "message"), [
    (["--nproc-per-node", "0"], "--nproc-per-node: must be an integer in [1, 1024]"),
    (["--signal", "USR1@90"], "'B:"),
    (["--nodes", "3"], "global_batch_size 32 is not divisible by micro_batch_size 4 × world_size 3"),
    (["optim.nope=1"], "optim.nope"),
    (["--nodes", "x"], "--nodes: must be an integer"),
])
def test_cli_submit_rejects_bad_input_in_one_line(tiny_config: Path, capsys, argv: list[str], message: str) -> None:
    code, out, err = run_cli(capsys, "slurm", "submit", str(tiny_config), "--dry-run", *argv)
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1, err


def test_cli_submit_needs_the_repository_root(tiny_config: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "slurm", "submit", str(tiny_config), "--dry-run")
    assert code == 2 and "launch/train.py" in err


@needs_bash
def test_cli_failed_submission_is_exit_1_in_one_line(tiny_config: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    _fake_command(tmp_path, "sbatch", "echo 'sbatch: error: invalid partition specified: gpu' >&2; exit 1")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    code, out, err = run_cli(capsys, "slurm", "submit", str(tiny_config), "--nproc-per-node", "2",
                             f"run_dir={tmp_path / 'r'}")
    assert (code, out) == (1, "")
    assert err.startswith("error: sbatch --parsable") and "invalid partition specified" in err
    assert err.count("\n") == 1


@needs_bash
def test_cli_status_prints_the_key_fields(tmp_path: Path, monkeypatch, capsys) -> None:
    line = ("JobId=7 JobName=tiny UserId=root(0) JobState=PENDING Reason=BeginTime Requeue=1 Restarts=1 "
            "BatchFlag=1 ExitCode=0:0 RunTime=00:00:12 NodeList=(null) StdOut=/r/slurm-7.out")
    _fake_command(tmp_path, "scontrol", f"echo '{line}'")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    code, out, _ = run_cli(capsys, "slurm", "status", "7")
    fields = dict(row.split(None, 1) for row in out.splitlines())
    assert code == 0 and list(fields) == ["JobId", "JobName", "JobState", "Reason", "Restarts", "ExitCode",
                                          "RunTime", "NodeList", "StdOut"]
    assert (fields["JobState"], fields["Restarts"], fields["ExitCode"]) == ("PENDING", "1", "0:0")
    code, out, _ = run_cli(capsys, "slurm", "status", "7", "--json")
    assert code == 0 and json.loads(out)["UserId"] == "root(0)"


@needs_bash
def test_cli_status_of_an_unknown_job_is_exit_1(tmp_path: Path, monkeypatch, capsys) -> None:
    _fake_command(tmp_path, "scontrol", "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    code, out, err = run_cli(capsys, "slurm", "status", "99")
    assert (code, out) == (1, "") and "Invalid job id specified" in err and err.count("\n") == 1


@needs_bash
@pytest.mark.parametrize(("argv", "scancel_args", "said"), [
    (["--signal", "USR1"], "--signal=USR1 --batch 42", "sent SIGUSR1 to the batch shell of job 42"),
    (["--signal", "sigterm"], "--signal=TERM --batch 42", "sent SIGTERM"),
    ([], "42", "cancelled job 42"),
])
def test_cli_cancel(tmp_path: Path, monkeypatch, capsys, argv: list[str], scancel_args: str, said: str) -> None:
    _fake_command(tmp_path, "scancel", f'echo "$@" > {tmp_path}/scancel-args')
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    code, out, _ = run_cli(capsys, "slurm", "cancel", "42", *argv)
    assert code == 0 and said in out
    assert (tmp_path / "scancel-args").read_text().strip() == scancel_args
