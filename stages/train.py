"""train: (Q)LoRA fine-tuning of the base model on processed + synthetic train rows → a peft adapter.

    python -m stages.train [--params params.yaml]
    accelerate launch --config_file configs/accelerate_ddp_cpu.yaml -m stages.train     # DDP, 2 CPU procs (gloo)
    accelerate launch --config_file configs/accelerate_fsdp_qlora.yaml -m stages.train  # multi-GPU QLoRA (FSDP)

transformers' Trainer does the loop (eval, checkpoints, resume, early stopping, DDP through accelerate).
What is ours: rows are encoded with the base model's chat template (loss on assistant tokens + end-of-turn
only), then grouped into micro-batches of at most `train.tokens_per_batch` real tokens. With `packing: true`
a micro-batch is one flat row with position ids restarting per example (padding-free, as transformers'
DataCollatorWithFlattening): attention never crosses examples and no pad token is computed.
Resume: checkpoints go to `<checkpoint_dir>/<run key>/` (key = hash of params, base model and data), so
after a kill the next run continues from the last complete checkpoint; a run with other params/data wipes
them. A finished run leaves `<run key>/final/` (adapter, metrics, curve), so `dvc repro -f` with unchanged
inputs re-exports the same bytes without training. Outputs: the adapter
(`paths.adapter_dir`, with tokenizer + train_provenance.json), `paths.train_metrics` and the per-step
`paths.train_curve`. Tracking: one MLflow run per training (MLFLOW_TRACKING_URI, else `paths.mlflow_uri`, a relative sqlite
path resolved against the main repo even from a `dvc queue` worker); `user:password@` in the URI becomes
MLFLOW_TRACKING_USERNAME/PASSWORD and is never printed; tracking failures only warn, except an explicitly set
MLFLOW_TRACKING_URI that is down (error before training).
Determinism: same params + data + machine + thread count → the same adapter bytes (tested on CPU); other CPUs,
thread counts or library versions may change float reduction order, hence the last bits.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import io as stdio
import json
import os
import random
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from llmops import chat, config, hardware, io, log, modeling, stage

CURVE_COLUMNS = ("step", "train_loss", "eval_loss", "lr", "tokens_per_s")


class TrainError(stage.StageError):
    pass


# ---------------------------------------------------------------- data


def encode_rows(rows: list[dict], tokenizer, eot_id: int, max_len: int) -> list[dict]:
    """Chat-template encode; loss only on assistant replies (+ their end-of-turn token)."""
    out = []
    for r in rows:
        try:
            enc = chat.encode(tokenizer, r["messages"], eot_id, max_len)
        except chat.ChatFormatError as e:
            raise TrainError(f"row {r.get('id')} ({r.get('source')}): {e}; rerun preprocess/synthetic") from None
        out.append({"input_ids": enc.input_ids, "labels": enc.labels})
    return out


def make_batches(examples: list[dict], tokens_per_batch: int, packing: bool, seed: int | None) -> list[dict]:
    """Group examples (shuffled with `seed`, in order if None) into micro-batches under a token budget.

    Packed: the sum of lengths ≤ budget. Padded: (examples × longest) ≤ budget, so both modes spend
    about the same memory per micro-batch. Each batch is one Trainer "sample" (batch size 1).
    """
    order = list(range(len(examples)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        n = len(examples[i]["input_ids"])
        if n > tokens_per_batch:
            raise TrainError(f"an example has {n} tokens > train.tokens_per_batch={tokens_per_batch}")
        cost = sum(len(examples[j]["input_ids"]) for j in cur) + n if packing else (len(cur) + 1) * max(longest, n)
        if cur and cost > tokens_per_batch:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    return [{"examples": [examples[i] for i in b]} for b in batches]


class Collator:
    """Packed: one flat row + per-example position ids, no attention mask (so transformers builds a
    block-diagonal causal mask from the position ids). Padded: right-padded rows + attention mask."""

    def __init__(self, packing: bool, pad_id: int):
        from transformers import DataCollatorWithFlattening

        self.packing, self.pad_id = packing, pad_id
        self.flatten = DataCollatorWithFlattening(return_position_ids=True)

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        feats = [ex for item in batch for ex in item["examples"]]
        if self.packing:
            return self.flatten(feats)
        width = max(len(f["input_ids"]) for f in feats)
        pad = [width - len(f["input_ids"]) for f in feats]
        return {
            "input_ids": torch.tensor([f["input_ids"] + [self.pad_id] * p for f, p in zip(feats, pad, strict=True)]),
            "labels": torch.tensor([f["labels"] + [chat.IGNORE_INDEX] * p for f, p in zip(feats, pad, strict=True)]),
            "attention_mask": torch.tensor(
                [[1] * len(f["input_ids"]) + [0] * p for f, p in zip(feats, pad, strict=True)]
            ),
        }


def run_key(t: config.Train, seed: int, max_seq_len: int, base_dir: Path, data_files: list[Path], world: int) -> str:
    """Checkpoints are resumable only by a run with the same params, base model, data and process count."""
    h = hashlib.sha256()
    prov = base_dir / "provenance.json"
    blob = {
        "train": config.asdict(t),
        "seed": seed,
        "max_seq_len": max_seq_len,
        "world": world,
        "base": prov.read_text() if prov.exists() else str(base_dir),
    }
    h.update(json.dumps(blob, sort_keys=True, default=str).encode())
    for f in data_files:
        h.update(io.sha256_file(f).encode())
    return h.hexdigest()[:16]


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint-N that was fully written (trainer_state.json is saved last); partial ones go."""
    done = []
    for c in run_dir.glob("checkpoint-*"):
        if (c / "trainer_state.json").exists():
            done.append(c)
        else:
            shutil.rmtree(c, ignore_errors=True)  # killed mid-save
    return max(done, key=lambda c: int(c.name.split("-")[1]), default=None)


# ---------------------------------------------------------------- tracking


def git_rev() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def tracking_uri(paths: config.Paths) -> tuple[str, bool]:
    """(URI, explicitly set?). A relative sqlite store resolves against the main repo, also from a
    `dvc exp run --queue` worker (which runs in .dvc/tmp/exps/<tmp>/): runs must not vanish with the temp copy."""
    explicit = os.environ.get("MLFLOW_TRACKING_URI")
    uri = explicit or paths.mlflow_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        root = os.environ.get("DVC_ROOT") or os.getcwd()
        root = root.split(f"{os.sep}.dvc{os.sep}tmp{os.sep}exps{os.sep}")[0]
        uri = "sqlite:///" + str(Path(root).resolve() / uri[len("sqlite:///") :])
    return uri, bool(explicit)


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """`http://user:pw@host` → (`http://host`, user, pw): MLflow takes basic auth from
    MLFLOW_TRACKING_USERNAME/PASSWORD, and the password must never reach a log line or error message."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.username and not parts.password:
        return uri, None, None
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    clean = urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return clean, urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.password or "")


class Tracker:
    """One MLflow run through MlflowClient: no fluent-API globals, so nothing leaks into the process
    (an active run, MLFLOW_TRACKING_URI). Every call after start only warns on failure, then goes quiet."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def log(self, metrics: dict, step: int) -> None:
        if not self.run_id:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        nums = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        try:
            self.client.log_batch(self.run_id, metrics=nums)
        except Exception as e:
            log.get("train").warning("mlflow_off", error=f"{type(e).__name__}: {e}")
            self.run_id = None

    def end(self, metrics: dict | None, step: int) -> None:
        """FINISHED with the final metrics, or FAILED when training raised."""
        if not self.run_id:
            return
        if metrics is not None:
            self.log({f"final_{k}": v for k, v in metrics.items()}, step)
        try:
            self.client.set_terminated(self.run_id, "FINISHED" if metrics is not None else "FAILED")
        except Exception as e:
            log.get("train").warning("mlflow_off", error=f"{type(e).__name__}: {e}")
        self.run_id = None


def mlflow_start(paths: config.Paths, experiment: str, run_dir: Path, params: dict) -> Tracker | None:
    """Start (or, on resume, reopen) the MLflow run; None = tracking off. An explicitly set
    MLFLOW_TRACKING_URI that does not answer is an error before training; the default store only warns."""
    uri, explicit = tracking_uri(paths)
    uri, user, password = split_credentials(uri)
    if user is not None:  # the client reads these; explicit env settings win
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", user)
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", password or "")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a dead server must not stall every step
    try:
        if uri.startswith(("http://", "https://")):
            req = urllib.request.Request(uri.rstrip("/") + "/health")
            if os.environ.get("MLFLOW_TRACKING_USERNAME"):
                token = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}"
                req.add_header("Authorization", "Basic " + base64.b64encode(token.encode()).decode())
            urllib.request.urlopen(req, timeout=10).read()
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        id_file = run_dir / "mlflow_run_id"
        prev = id_file.read_text().strip() if id_file.exists() else None
        if prev:  # a resumed training continues its MLflow run
            try:
                client.update_run(prev, status="RUNNING")
                return Tracker(client, prev)
            except Exception:
                pass
        tags = {"mlflow.source.name": "stages/train.py"}
        if exp_name := os.environ.get("DVC_EXP_NAME"):
            tags["dvc_exp_name"] = exp_name
        if rev := git_rev():
            tags["git_rev"] = rev
        run = client.create_run(exp_id, tags=tags, run_name=run_dir.name)
        client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        io.write_text(id_file, run.info.run_id)
        return Tracker(client, run.info.run_id)
    except Exception as e:
        msg = f"{type(e).__name__}: {e}".replace(password, "***") if password else f"{type(e).__name__}: {e}"
        if explicit:
            raise TrainError(
                f"MLFLOW_TRACKING_URI={uri} is unreachable or refused the run ({msg}); start the MLflow server "
                "(or fix its credentials), or unset MLFLOW_TRACKING_URI to track into the local store paths.mlflow_uri"
            ) from None
        log.get("train").warning("mlflow_off", uri=uri, error=msg)
        return None


def callbacks(tracker: Tracker | None, patience: int, threshold: float) -> list:
    from transformers import EarlyStoppingCallback, TrainerCallback

    class StepLog(TrainerCallback):
        """Adds each step's real tokens/s (forward+backward+optimizer time; evals and saves excluded) to
        the log history, which checkpoints carry, so the curve survives a resume. Mirrors logs to MLflow,
        where a failure turns tracking off, never the training."""

        def __init__(self):
            self.rate = None
            self.session_tokens, self.session_s = 0, 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t, self.tokens = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kw):
            dt, n = time.perf_counter() - self.t, state.num_input_tokens_seen - self.tokens
            self.session_tokens, self.session_s, self.rate = self.session_tokens + n, self.session_s + dt, n / dt

        def on_log(self, args, state, control, logs=None, **kw):
            if "loss" in (logs or {}) and self.rate is not None:
                state.log_history[-1]["tokens_per_s"] = self.rate
            if tracker and state.is_world_process_zero:
                tracker.log({k: v for k, v in state.log_history[-1].items() if k != "step"}, state.global_step)

    stop = [EarlyStoppingCallback(early_stopping_patience=patience, early_stopping_threshold=threshold)]
    return [StepLog()] + (stop if patience else [])


def session_rate(trainer) -> float | None:
    """Real (non-padding) tokens per second of optimizer-step time in this run (all processes)."""
    cb = next(cb for cb in trainer.callback_handler.callbacks if hasattr(cb, "session_tokens"))
    return cb.session_tokens / cb.session_s if cb.session_s else None


def curve(log_history: list[dict], base_eval_loss: float | None) -> list[dict]:
    """One row per optimizer step (+ step 0 = base model), from the Trainer's log history."""
    rows: dict[int, dict] = {0: {"step": 0, "eval_loss": base_eval_loss}} if base_eval_loss is not None else {}
    for e in log_history:
        row = rows.setdefault(e["step"], {"step": e["step"]})
        if "loss" in e:
            row.update(train_loss=e["loss"], lr=e.get("learning_rate"), tokens_per_s=e.get("tokens_per_s"))
        if "eval_loss" in e:
            row["eval_loss"] = e["eval_loss"]
    return [rows[s] for s in sorted(rows)]


def to_csv(rows: list[dict]) -> str:
    buf = stdio.StringIO()
    w = csv.DictWriter(buf, CURVE_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{r[k]:.6g}" if isinstance(r.get(k), float) else r.get(k, "")) for k in CURVE_COLUMNS})
    return buf.getvalue()


# ---------------------------------------------------------------- model


def build_model(base_dir: Path, t: config.Train, compute_dtype: str, device_map, seed: int):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    try:
        model = modeling.load_model(
            base_dir, quantize_4bit=t.method == "qlora", dtype=compute_dtype, device_map=device_map
        )
    except RuntimeError as e:  # bitsandbytes missing, CUDA asked for on a CPU box
        raise TrainError(str(e)) from None
    if t.method == "qlora":
        # Norms/embeddings to fp32 for stable QLoRA; checkpointing is wired here for k-bit models.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=t.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    model.config.use_cache = False
    set_seed(seed)  # LoRA A init draws from the torch RNG
    lora = LoraConfig(
        r=t.lora_r,
        lora_alpha=t.lora_alpha,
        lora_dropout=t.lora_dropout,
        target_modules=list(t.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def resolve_compute(t: config.Train) -> tuple[str, object]:
    """Device map + compute dtype for this process (bf16 where the device has it), or a clear error."""
    import torch

    cuda = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dtype = modeling.resolve_dtype(t.compute_dtype)
    if dtype == "float16" and not cuda:
        raise TrainError("train.compute_dtype=float16 needs a CUDA GPU; use auto, bfloat16 or float32 on CPU")
    if dtype == "bfloat16" and cuda and not torch.cuda.is_bf16_supported():
        raise TrainError("train.compute_dtype=bfloat16 but this GPU lacks bf16; use auto or float16")
    if dtype == "bfloat16" and not cuda and not hardware.cpu_has_native_bf16():
        log.get("train").warning(
            "bf16_emulated", hint="this CPU lacks AVX512-BF16/AMX: compute_dtype auto (fp32) is faster"
        )
    spec = t.device_map
    if world > 1:
        if isinstance(spec, dict):
            raise TrainError(
                "train.device_map as a mapping splits one model over GPUs; it cannot be combined "
                "with DDP (accelerate launch --num_processes > 1); use device_map: auto"
            )
        # DDP: each process holds a full replica on its own device.
        spec = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda and spec == "auto" else spec
    try:
        return dtype, modeling.resolve_device_map(spec)
    except (RuntimeError, ValueError) as e:
        raise TrainError(str(e)) from None


def training_args(t: config.Train, out: Path, seed: int, compute_dtype: str):
    import torch
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=1,  # one "sample" = one token-budget micro-batch
        per_device_eval_batch_size=1,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.lr,
        lr_scheduler_type="constant_with_warmup" if t.scheduler == "constant" else t.scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        # Autocast only on GPUs: on CPU the weights already are in compute_dtype (autocast would only add casts).
        bf16=cuda and compute_dtype == "bfloat16",
        fp16=cuda and compute_dtype == "float16",
        gradient_checkpointing=t.gradient_checkpointing and t.method == "lora",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        eval_strategy="steps",
        eval_steps=t.eval_every,
        save_strategy="steps",
        save_steps=t.save_every,
        save_total_limit=2,
        load_best_model_at_end=t.early_stopping_patience > 0,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=1,
        include_num_input_tokens_seen="all" if t.packing else "non_padding",  # packed rows hold no padding
        prediction_loss_only=True,
        label_names=["labels"],
        report_to="none",  # MLflow is ours: its failures must not stop training
        seed=seed,
        data_seed=seed,
        use_cpu=not cuda,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        remove_unused_columns=False,  # our samples are token-budget batches, not model kwargs
        save_only_model=False,
    )


# ---------------------------------------------------------------- main


def checkpoint_run_dir(root: Path, key: str, wipe_others: bool) -> Path:
    """`<root>/<key>/`; runs under any other key can never be resumed, so their space is reclaimed."""
    if wipe_others and root.exists():
        for other in root.iterdir():
            if other.name != key:
                log.get("train").info("wipe_stale_checkpoints", path=str(other))
                shutil.rmtree(other, ignore_errors=True) if other.is_dir() else other.unlink()
    (root / key).mkdir(parents=True, exist_ok=True)
    return root / key


def summarize(trainer, result, base_loss: float, final_eval: float, resume: Path | None, t: config.Train) -> dict:
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "method": t.method,
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "base_eval_loss": base_loss,
        "eval_loss": final_eval,
        "train_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),  # mean of the last 10 steps
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "tokens_per_s": session_rate(trainer),  # real tokens (no padding) / optimizer-step time, this session
        "train_wall_s": round(result.metrics["train_runtime"], 2),  # this session, evals and saves included
        "resumed_from_step": int(resume.name.split("-")[1]) if resume else 0,
    }


def main(params_file: str = "params.yaml") -> dict:
    t0 = time.perf_counter()
    p = config.load(params_file, "train", "preprocess")
    t, paths, max_len = p.train, p.paths, p.preprocess.max_seq_len
    if t.tokens_per_batch < max_len:
        raise TrainError(
            f"train.tokens_per_batch={t.tokens_per_batch} < preprocess.max_seq_len={max_len}: "
            "a longest example would not fit one micro-batch"
        )
    if t.early_stopping_patience and t.save_every % t.eval_every:
        raise TrainError(
            "train.early_stopping_patience > 0 restores the best checkpoint, so train.save_every "
            f"({t.save_every}) must be a multiple of train.eval_every ({t.eval_every})"
        )
    compute_dtype, device_map = resolve_compute(t)
    logger = log.get("train")
    base_dir = Path(paths.base_dir)
    files = {
        "train": Path(paths.processed_dir) / "train.jsonl",
        "synthetic": Path(paths.synthetic_dir) / "train.jsonl",
        "val": Path(paths.processed_dir) / "val.jsonl",
    }
    for f in files.values():
        if not f.exists():
            raise TrainError(f"{f} missing: run `dvc repro preprocess synthetic` first")
    train_rows = io.read_jsonl(files["train"]) + io.read_jsonl(files["synthetic"])
    val_rows = io.read_jsonl(files["val"])
    if not val_rows:
        raise TrainError(f"{files['val']} is empty: eval needs a val split (preprocess.val_frac > 0)")
    world, rank0 = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")) == 0
    key = run_key(t, p.seed, max_len, base_dir, list(files.values()), world)
    run_dir = checkpoint_run_dir(Path(paths.checkpoint_dir), key, wipe_others=rank0)
    final = run_dir / "final"
    if (final / "metrics.json").exists():  # this exact run already finished: re-export, don't train again
        if rank0:
            export(final, paths)
            logger.info("reexported", run_key=key, adapter=paths.adapter_dir)
        return json.loads((final / "metrics.json").read_text()) if rank0 else {}
    resume = last_complete_checkpoint(run_dir)
    params = {
        **config.asdict(t),
        "seed": p.seed,
        "max_seq_len": max_len,
        "compute_dtype_resolved": compute_dtype,
        "run_key": key,
        "train_rows": len(train_rows),
        "val_rows": len(val_rows),
        "world_size": world,
    }
    tracker = mlflow_start(paths, t.mlflow_experiment, run_dir, params) if rank0 else None  # fails before training
    try:
        metrics = fit(p, base_dir, run_dir, resume, tracker, train_rows, val_rows, compute_dtype, device_map, t0)
        if not rank0:
            return {}
        export(final, paths)
        if tracker:
            tracker.end(metrics, metrics["steps"])
        logger.info("done", **{k: metrics[k] for k in ("steps", "base_eval_loss", "eval_loss", "tokens_per_s")})
        return metrics
    finally:
        if tracker:
            tracker.end(None, 0)  # no-op after a successful end


def fit(
    p, base_dir: Path, run_dir: Path, resume: Path | None, tracker, train_rows, val_rows, compute_dtype, device_map, t0
):
    """Train (or resume) under the Trainer; rank 0 writes the finished adapter, its curve and metrics into
    `run_dir/final/` in one atomic step (so `final/` exists only for a finished run) and returns the metrics."""
    from transformers import Trainer

    t, max_len = p.train, p.preprocess.max_seq_len
    rank0 = int(os.environ.get("RANK", "0")) == 0
    tokenizer = modeling.load_tokenizer(base_dir)
    eot = chat.end_of_turn_id(tokenizer)
    train_ex = encode_rows(train_rows, tokenizer, eot, max_len)
    train_ds = make_batches(train_ex, t.tokens_per_batch, t.packing, p.seed)
    val_ds = make_batches(encode_rows(val_rows, tokenizer, eot, max_len), t.tokens_per_batch, t.packing, None)
    log.get("train").info(
        "data",
        train_rows=len(train_rows),
        val_rows=len(val_rows),
        train_batches=len(train_ds),
        train_tokens=sum(len(e["input_ids"]) for e in train_ex),
        run_dir=str(run_dir),
        resume=str(resume or ""),
    )
    trainer = Trainer(
        model=build_model(base_dir, t, compute_dtype, device_map, p.seed),
        args=training_args(t, run_dir, p.seed, compute_dtype),
        train_dataset=train_ds,
        eval_dataset=val_ds,
        data_collator=Collator(t.packing, tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=callbacks(tracker, t.early_stopping_patience, t.early_stopping_threshold),
    )
    base_file = run_dir / "base_eval.json"
    if base_file.exists():
        base_loss = json.loads(base_file.read_text())["eval_loss"]
    else:  # LoRA B starts at zero: the untrained peft model is the base model
        base_loss = trainer.evaluate()["eval_loss"]
        if rank0:
            io.write_json(base_file, {"eval_loss": base_loss})
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except (RuntimeError, MemoryError) as e:
        if isinstance(e, MemoryError) or "out of memory" in str(e) or "can't allocate memory" in str(e):
            raise TrainError(
                f"out of memory: lower train.tokens_per_batch ({t.tokens_per_batch}) or preprocess.max_seq_len "
                f"({max_len}), or set train.gradient_checkpointing: true"
            ) from e
        raise
    step, history = trainer.state.global_step, list(trainer.state.log_history)  # the curve: what each step logged
    last = next((e for e in reversed(history) if "eval_loss" in e), None)
    if last is None or last["step"] != step:  # the schedule made no eval at the last step
        last = {"step": step, **trainer.evaluate()}
        history.append(last)
    # Early stopping restored the best checkpoint: its loss, evaluated again, is the run's result (not in the curve).
    final_loss = trainer.evaluate()["eval_loss"] if t.early_stopping_patience else last["eval_loss"]
    # Every rank takes part in the save (FSDP gathers the shards); only the main process writes.
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    with io.atomic_dir(run_dir / "final") if rank0 else _scratch(run_dir) as tmp:
        trainer.save_model(str(tmp))
        if not rank0:
            return {}
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle holding run paths: never shipped
        tokenizer.save_pretrained(tmp)
        io.write_json(tmp / "train_provenance.json", {
            "method": t.method, "compute_dtype": compute_dtype, "base_dir": str(base_dir),
            "base_provenance": json.loads((base_dir / "provenance.json").read_text()),
            "seed": p.seed, "train": config.asdict(t), "eot_id": eot,
        })  # fmt: skip
        io.write_text(tmp / "curve.csv", to_csv(curve(history, base_loss)))
        metrics = summarize(trainer, result, base_loss, final_loss, resume, t)
        metrics.update(
            compute_dtype=compute_dtype, machine=hardware.machine(), train_rows=len(train_rows), val_rows=len(val_rows)
        )
        metrics["stage_wall_s"] = round(time.perf_counter() - t0, 2)
        io.write_json(tmp / "metrics.json", metrics)
    return metrics


@contextlib.contextmanager
def _scratch(run_dir: Path):
    """Non-main DDP/FSDP ranks join save_model's collectives but write nowhere that matters."""
    with tempfile.TemporaryDirectory(dir=run_dir) as d:
        yield Path(d)


def export(final: Path, paths: config.Paths) -> None:
    """`run_dir/final/` → the stage outputs: the adapter folder, metrics and curve (each replaced atomically)."""
    with io.atomic_dir(paths.adapter_dir) as tmp:
        for f in final.iterdir():
            if f.name not in ("metrics.json", "curve.csv"):
                shutil.copy2(f, tmp / f.name)
    io.write_text(paths.train_metrics, (final / "metrics.json").read_text())
    io.write_text(paths.train_curve, (final / "curve.csv").read_text())


if __name__ == "__main__":
    stage.run("train", main, __doc__)
