"""Tracking for the train stage: one MLflow run per training (a resumed training continues it), tagged with the DVC
experiment name and the git revision so MLflow and `dvc exp show` agree, plus the step clock behind tokens/s.

Through `MlflowClient`, not transformers' MLflowCallback: the callback drives MLflow's fluent API, whose process
globals (the active run, MLFLOW_TRACKING_URI) outlive a failed training in the same process, it ends the run before
the stage's final evaluation, and it never marks a failed training FAILED. Tracking never stops a training: after a
start that works, any failure turns it off with one warning. A MLFLOW_TRACKING_URI set in the environment that does
not answer is an error before training (the user asked for that server); the default store (`paths.mlflow_uri`)
only warns. Credentials in the URI (`http://user:pw@host`) go to MLFLOW_TRACKING_USERNAME/PASSWORD and are never
printed.
"""

from __future__ import annotations

import csv
import io as stdio
import os
import subprocess
import time
import urllib.parse
from pathlib import Path

from llmops import io, log
from llmops.stage import StageError

CURVE_COLUMNS = ("step", "train_loss", "eval_loss", "lr")


def resolve_uri(default: str) -> tuple[str, bool]:
    """(URI, set in the environment?). A relative sqlite store resolves against the main repo, also from a
    `dvc exp run --queue` worker (it runs in .dvc/tmp/exps/<tmp>/): runs must not vanish with the temp copy."""
    explicit = os.environ.get("MLFLOW_TRACKING_URI")
    uri = explicit or default
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        root = (os.environ.get("DVC_ROOT") or os.getcwd()).split(f"{os.sep}.dvc{os.sep}tmp{os.sep}exps{os.sep}")[0]
        uri = "sqlite:///" + str(Path(root).resolve() / uri[len("sqlite:///") :])
    return uri, bool(explicit)


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """`http://user:pw@host` → (`http://host`, user, pw)."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.username and not parts.password:
        return uri, None, None
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    clean = urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return clean, urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.password or "")


def git_rev() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


class Run:
    """One MLflow run; every call only warns on failure, then tracking goes quiet."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def _off(self, e: Exception) -> None:
        log.get("train").warning("mlflow_off", error=f"{type(e).__name__}: {e}")
        self.run_id = None

    def log(self, metrics: dict, step: int) -> None:
        if not self.run_id:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        nums = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        try:
            self.client.log_batch(self.run_id, metrics=nums)
        except Exception as e:
            self._off(e)

    def end(self, metrics: dict | None, step: int) -> None:
        """FINISHED with the final metrics, or FAILED (metrics None, e.g. from a `finally`); once."""
        if not self.run_id:
            return
        if metrics is not None:
            self.log({f"final_{k}": v for k, v in metrics.items()}, step)
        try:
            self.client.set_terminated(self.run_id, "FINISHED" if metrics is not None else "FAILED")
        except Exception as e:
            self._off(e)
        self.run_id = None


def start(default_uri: str, experiment: str, run_dir: Path, params: dict) -> Run | None:
    """Start the run of `run_dir` (or reopen it when that training resumes); None = tracking off."""
    uri, explicit = resolve_uri(default_uri)
    uri, user, password = split_credentials(uri)
    if user is not None:  # the client reads these; settings already in the environment win
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", user)
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", password or "")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a dead server must not stall every step
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)  # also the probe: a dead or refusing server fails here
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        id_file = run_dir / "mlflow_run_id"
        if id_file.exists():  # a resumed training continues its run
            try:
                client.update_run(prev := id_file.read_text().strip(), status="RUNNING")
                return Run(client, prev)
            except Exception:
                pass  # deleted meanwhile, or another store: start a new one
        tags = {"mlflow.source.name": "stages/train.py", "dvc_exp_name": os.environ.get("DVC_EXP_NAME"),
                "git_rev": git_rev()}  # fmt: skip
        run = client.create_run(exp_id, tags={k: v for k, v in tags.items() if v}, run_name=run_dir.name)
        client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        io.write_text(id_file, run.info.run_id)
        return Run(client, run.info.run_id)
    except Exception as e:
        msg = f"{type(e).__name__}: {e}".replace("\n", " ")
        msg = msg.replace(password, "***") if password else msg
        if explicit:
            raise StageError(
                f"MLFLOW_TRACKING_URI={uri} is unreachable or refused the run ({msg[:300]}); start the MLflow server "
                "(or fix its credentials), or unset MLFLOW_TRACKING_URI to track into the local store paths.mlflow_uri"
            ) from None
        log.get("train").warning("mlflow_off", uri=uri, error=msg)
        return None


def callbacks(run: Run | None) -> list:
    """The step clock (tokens/s per step in the log history, so it survives a resume) and, with a run, the
    mirror of every Trainer log line to MLflow."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Real tokens per second of forward+backward+optimizer time; evals and saves are excluded."""

        def __init__(self):
            self.rate, self.tokens, self.seconds = None, 0, 0.0

        def on_step_begin(self, args, state, control, **kw):
            self._t, self._n = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kw):
            dt, n = time.perf_counter() - self._t, state.num_input_tokens_seen - self._n
            self.tokens, self.seconds, self.rate = self.tokens + n, self.seconds + dt, n / dt

        def on_log(self, args, state, control, logs=None, **kw):
            if "loss" in (logs or {}) and self.rate is not None:
                state.log_history[-1]["tokens_per_s"] = self.rate
            if run and state.is_world_process_zero:
                run.log({k: v for k, v in state.log_history[-1].items() if k != "step"}, state.global_step)

    return [StepClock()]


def session_rate(trainer) -> float | None:
    """Real (non-padding) tokens per second of optimizer-step time in this session (all processes)."""
    clock = next(cb for cb in trainer.callback_handler.callbacks if hasattr(cb, "seconds"))
    return clock.tokens / clock.seconds if clock.seconds else None


def curve_csv(log_history: list[dict], base_eval_loss: float) -> str:
    """One row per optimizer step (+ step 0 = base model), from the Trainer's log history."""
    rows: dict[int, dict] = {0: {"step": 0, "eval_loss": base_eval_loss}}
    for e in log_history:
        row = rows.setdefault(e["step"], {"step": e["step"]})
        if "loss" in e:
            row.update(train_loss=e["loss"], lr=e.get("learning_rate"))
        if "eval_loss" in e:
            row["eval_loss"] = e["eval_loss"]
    buf = stdio.StringIO()
    w = csv.DictWriter(buf, CURVE_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in (rows[s] for s in sorted(rows)):
        w.writerow({k: (f"{r[k]:.6g}" if isinstance(r.get(k), float) else r.get(k, "")) for k in CURVE_COLUMNS})
    return buf.getvalue()
