"""Rank-0 experiment trackers: wandb, TensorBoard and MLflow, each fed the rows of metrics.jsonl.

Every sink has `log(row)`, `summary(summary)` and `close()`, and never stops training: a failure (missing
package, network, a full disk) disables that sink with one warning. One tracker run per training run: the wandb
and MLflow run ids live in run_dir/trackers.json and are reused on resume and SLURM requeue, so steps go on
where they stopped; a fresh run moves trackers.json aside with the other outputs (rundir.OUTPUT_NAMES) and
starts fresh tracker runs. Steps are iterations; samples_seen is logged with every row for a samples axis.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from ddp_toolkit.rundir import atomic_write

__all__ = ["MlflowSink", "TensorBoardSink", "TrackerIds", "WandbSink", "numeric_fields", "open_sinks"]

TRACKERS_FILE = "trackers.json"
MLFLOW_CLOSE_TIMEOUT_S = 300.0
"""How long close() waits for MLflow's background thread (a fresh SQLite store takes seconds to create)."""


def numeric_fields(row: dict) -> dict[str, float]:
    """The numbers of a row a tracker plots: everything numeric but the step; eval rows only their eval_* keys."""
    evaluation = row.get("kind") == "eval"
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k != "iteration" and (not evaluation or k.startswith("eval_"))}


def _reason(err: BaseException) -> str:
    text = str(err).splitlines()[0][:300] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts as `a.b.c -> text` (lists as JSON): the plan and the config as tracker parameters."""
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data if isinstance(data, str) else json.dumps(data)}


class TrackerIds:
    """run_dir/trackers.json: the tracker run ids of this run_dir (read at start, written when a run opens)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / TRACKERS_FILE
        self._lock = threading.Lock()
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            data = {}
        self.data: dict = data if isinstance(data, dict) else {}

    def get(self, name: str) -> Any:
        return self.data.get(name)

    def set(self, name: str, value: Any) -> None:
        with self._lock:
            self.data[name] = value
            atomic_write(self.path, json.dumps(self.data, indent=2) + "\n")


class _Sink:
    """Disables itself with one warning on the first failure."""

    name = "sink"

    def __init__(self, warn) -> None:
        self.warn, self.failed = warn, False

    def _guard(self, what: str, fn, *args) -> None:
        if self.failed:
            return
        try:
            fn(*args)
        except Exception as err:  # a tracker never stops training
            self.failed = True
            self.warn(f"{self.name} {what} failed ({_reason(err)}); continuing without {self.name}")


# ---- wandb --------------------------------------------------------------------------------------------------
class WandbSink(_Sink):
    """Weights & Biases; the run id is kept in trackers.json and resumed (resume='allow')."""

    name = "wandb"

    def __init__(self, run, warn) -> None:
        super().__init__(warn)
        self.run = run

    @classmethod
    def open(cls, cfg, info: dict, warn, ids: TrackerIds) -> WandbSink | None:
        try:
            import wandb

            run_id = ids.get("wandb") or secrets.token_hex(4)  # wandb's own id maker moves between versions
            run = wandb.init(project=cfg.report.wandb_project, name=cfg.report.run_name or Path(cfg.run_dir).name,
                             tags=cfg.report.tags, dir=str(Path(cfg.run_dir)), id=run_id, resume="allow",
                             config={"config": cfg.model_dump(), "plan": info},
                             settings=wandb.Settings(init_timeout=60, silent=True))
            ids.set("wandb", run.id)
            return cls(run, warn)
        except Exception as err:  # network, auth, missing package: training goes on
            warn(f"wandb disabled: {_reason(err)}")
            return None

    def log(self, row: dict) -> None:
        self._guard("log", lambda: self.run.log(numeric_fields(row), step=row["iteration"]))

    def _summary(self, summary: dict) -> None:
        for key, value in summary.items():
            self.run.summary[key] = value

    def summary(self, summary: dict) -> None:
        self._guard("summary", self._summary, summary)

    def close(self) -> None:
        if not self.failed:
            self._guard("finish", self.run.finish)
        self.failed = True


# ---- TensorBoard ----------------------------------------------------------------------------------------------
class TensorBoardSink(_Sink):
    """Event files in run_dir/tensorboard (step = iteration) and run_dir/tensorboard/by_samples (step =
    samples seen, loss only); on resume the events past the checkpoint are purged (SummaryWriter purge_step)."""

    name = "tensorboard"

    def __init__(self, writer, by_samples, warn) -> None:
        super().__init__(warn)
        self.writer, self.by_samples, self.last_step = writer, by_samples, 0

    @classmethod
    def open(cls, cfg, info: dict, warn, start: tuple[int, int]) -> TensorBoardSink | None:
        """`start`: (iteration, samples_seen) the run starts from (0, 0) or resumes at."""
        try:
            from torch.utils.tensorboard import SummaryWriter

            root = Path(cfg.run_dir) / "tensorboard"
            iteration, samples = start
            writer = SummaryWriter(str(root), purge_step=iteration + 1 if iteration else None)
            by_samples = SummaryWriter(str(root / "by_samples"), purge_step=samples + 1 if samples else None)
            writer.add_text("plan", _code_block(info), iteration)
            writer.add_text("config", _code_block(cfg.model_dump()), iteration)
            sink = cls(writer, by_samples, warn)
            sink.last_step = iteration
            return sink
        except Exception as err:
            warn(f"tensorboard disabled: {_reason(err)}")
            return None

    def _log(self, row: dict) -> None:
        step = self.last_step = row["iteration"]
        for key, value in numeric_fields(row).items():
            self.writer.add_scalar(key, value, step)
        for key in ("loss", "eval_loss"):
            if isinstance(row.get(key), (int, float)):
                self.by_samples.add_scalar(f"{key}_vs_samples", row[key], row["samples_seen"])

    def log(self, row: dict) -> None:
        self._guard("log", self._log, row)

    def _summary(self, summary: dict) -> None:
        self.writer.add_text("summary", _code_block(summary), self.last_step)
        for key, value in numeric_fields({**summary, "kind": "summary"}).items():
            self.writer.add_scalar(f"summary/{key}", value, self.last_step)

    def summary(self, summary: dict) -> None:
        self._guard("summary", self._summary, summary)

    def close(self) -> None:
        self._guard("close", lambda: (self.writer.close(), self.by_samples.close()))
        self.failed = True


def _code_block(data: Any) -> str:
    """JSON in a markdown code block (TensorBoard renders text as markdown)."""
    return "```\n" + json.dumps(data, indent=2, default=str) + "\n```"


# ---- MLflow ---------------------------------------------------------------------------------------------------
class MlflowSink(_Sink):
    """MLflow through `MlflowClient` (no global active run), in a background thread: opening a fresh SQLite
    store and each write take ~0.1–10 s, which the loop must not wait for. Rows are queued and sent in batches;
    the plan and config become run parameters, the summary `summary.*` metrics at the last step."""

    name = "mlflow"

    def __init__(self, cfg, info: dict, warn, ids: TrackerIds, start_iteration: int) -> None:
        super().__init__(warn)
        self.cfg, self.info, self.ids, self.start_iteration = cfg, info, ids, start_iteration
        self.run_dir = Path(cfg.run_dir).resolve()
        self.uri = cfg.report.mlflow_tracking_uri or f"sqlite:///{self.run_dir / 'mlflow.db'}"
        self.client, self.run_id, self.last_step, self.status = None, None, start_iteration, "KILLED"
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="ddp-toolkit-mlflow", daemon=True)

    @classmethod
    def open(cls, cfg, info: dict, warn, ids: TrackerIds, start_iteration: int) -> MlflowSink:
        sink = cls(cfg, info, warn, ids, start_iteration)
        sink._thread.start()
        return sink

    def log(self, row: dict) -> None:
        if not self.failed:
            self._queue.put(("row", row, int(time.time() * 1000)))

    def summary(self, summary: dict) -> None:
        if not self.failed:
            self._queue.put(("summary", summary, int(time.time() * 1000)))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(MLFLOW_CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            self.warn(f"mlflow did not finish writing within {MLFLOW_CLOSE_TIMEOUT_S:.0f} s; rows may be missing")

    # -- the background thread ----------------------------------------------------------------------------------
    def _work(self) -> None:
        self._guard("start", self._open)
        done = False
        while not done:
            items = [self._queue.get()]
            while not self._queue.empty():  # everything queued goes in one request
                items.append(self._queue.get())
            done = items[-1] is None
            self._guard("log", self._send, [i for i in items if i is not None])
        self._guard("end", lambda: self.client.set_terminated(self.run_id, status=self.status))

    def _open(self) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # a training run sends nothing unless asked
        from mlflow.tracking import MlflowClient

        self.client = client = MlflowClient(tracking_uri=self.uri)
        stored = self.ids.get("mlflow") or {}
        if stored.get("tracking_uri") == self.uri and stored.get("run_id"):
            run = client.get_run(stored["run_id"])
            client.update_run(run.info.run_id, status="RUNNING")
        else:
            run = client.create_run(self._experiment_id(), run_name=self.cfg.report.run_name or self.run_dir.name,
                                    tags={"ddp_toolkit.run_dir": str(self.run_dir),
                                          **{tag: "" for tag in self.cfg.report.tags}})
        self.run_id = run.info.run_id
        self.ids.set("mlflow", {"run_id": self.run_id, "tracking_uri": self.uri})
        self._log_params(run.data.params)

    def _experiment_id(self) -> str:
        name = self.cfg.report.mlflow_experiment
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        local = self.cfg.report.mlflow_tracking_uri is None  # keep artifacts in run_dir, not the working directory
        return self.client.create_experiment(name, artifact_location=(self.run_dir / "mlflow-artifacts").as_uri()
                                             if local else None)

    def _log_params(self, existing: dict) -> None:
        """New parameters are logged; a value that changed on resume (MLflow params are immutable) is a tag."""
        from mlflow.entities import Param, RunTag

        params = {**flatten(self.info, "plan."), **flatten(self.cfg.model_dump(), "config.")}
        params = {k: v[:6000] for k, v in params.items()}
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        changed = [RunTag(f"resumed.{k}", v) for k, v in params.items() if k in existing and existing[k] != v]
        for i in range(0, len(new), 100):  # MLflow takes at most 100 params per request
            self.client.log_batch(self.run_id, params=new[i:i + 100])
        if changed:
            self.client.log_batch(self.run_id, tags=changed)

    def _send(self, items: list) -> None:
        from mlflow.entities import Metric

        metrics = []
        for kind, data, stamp in items:
            if kind == "row":
                self.last_step = data["iteration"]
                metrics += [Metric(k, float(v), stamp, self.last_step) for k, v in numeric_fields(data).items()]
            else:
                self.status = "FINISHED"
                values = numeric_fields({**data, "kind": "summary"})
                metrics += [Metric(f"summary.{k}", float(v), stamp, self.last_step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per request
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])


def open_sinks(cfg, info: dict, warn, start: tuple[int, int]) -> list:
    """The trackers `cfg.report` asks for, opened (a failing one is left out with a warning)."""
    ids = TrackerIds(Path(cfg.run_dir))
    sinks: list = []
    if cfg.report.wandb:
        sinks.append(WandbSink.open(cfg, info, warn, ids))
    if cfg.report.tensorboard:
        sinks.append(TensorBoardSink.open(cfg, info, warn, start))
    if cfg.report.mlflow:
        sinks.append(MlflowSink.open(cfg, info, warn, ids, start[0]))
    return [s for s in sinks if s is not None]
