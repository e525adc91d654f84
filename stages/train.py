"""train: (Q)LoRA fine-tuning of the base model on processed + synthetic train rows → a peft adapter.

    python -m stages.train [--params params.yaml]
    accelerate launch --config_file configs/accelerate_ddp_cpu.yaml -m stages.train     # DDP, 2 CPU procs (gloo)
    accelerate launch --config_file configs/accelerate_fsdp_qlora.yaml -m stages.train  # multi-GPU QLoRA (FSDP)

transformers' Trainer runs the loop (eval, checkpoints, resume, early stopping, NEFTune, DDP through accelerate)
over token-budget micro-batches (llmops.packing). Runs live under `paths.checkpoint_dir` (llmops.checkpoints): a
killed run resumes, a finished one is exported again, not retrained, the last few are kept; MLflow: one run per
training (llmops.tracking). Params, inputs, target modules, tracking server: checked before any training or deletion.
Outputs: the adapter (`paths.adapter_dir`, + tokenizer and train_provenance.json), `paths.train_metrics` and the
per-step `paths.train_curve`, all byte-identical for identical inputs on one machine (same thread count), and
`paths.train_speed` (tokens/s, seconds: the one output that differs run to run; no stage depends on it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from llmops import chat, checkpoints, config, hardware, io, log, modeling, packing, stage, tracking
from llmops.stage import StageError

FINAL_FILES = {"metrics.json": "train_metrics", "curve.csv": "train_curve", "speed.json": "train_speed"}


def processes() -> tuple[int, bool]:
    """(world size, is this the main process?) under accelerate/torchrun; (1, True) otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------- model


def build_model(base_dir: Path, t: config.Train, compute_dtype: str, device_map, seed: int):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    try:
        model = modeling.load_model(base_dir, quantize_4bit=t.method == "qlora", dtype=compute_dtype,
                                    device_map=device_map)  # fmt: skip
    except RuntimeError as e:  # bitsandbytes missing, CUDA asked for on a CPU box
        raise StageError(str(e)) from None
    if t.method == "qlora":  # norms/embeddings to fp32 for stable QLoRA; checkpointing is wired here for k-bit models
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})  # fmt: skip
    model.config.use_cache = False
    set_seed(seed)  # LoRA A init draws from the torch RNG
    model = get_peft_model(model, LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                                             target_modules=sorted(t.target_modules), task_type="CAUSAL_LM"))  # fmt: skip
    return modeling.compile_layers(model) if t.compile == "layers" else model


def resolve_compute(t: config.Train, world: int) -> tuple[str, object]:
    """Compute dtype + device map for this process (bf16 where the device has it), or a clear error."""
    import torch

    cuda = torch.cuda.is_available()
    dtype = modeling.resolve_dtype(t.compute_dtype)
    if dtype == "float16" and not cuda:
        raise StageError("train.compute_dtype=float16 needs a CUDA GPU; use auto, bfloat16 or float32 on CPU")
    if dtype == "bfloat16" and cuda and not torch.cuda.is_bf16_supported():
        raise StageError("train.compute_dtype=bfloat16 but this GPU lacks bf16; use auto or float16")
    if dtype == "bfloat16" and not cuda and not hardware.cpu_has_native_bf16():
        log.get("train").warning("bf16_emulated", hint="this CPU lacks AVX512-BF16/AMX: compute_dtype auto is faster")
    spec = t.device_map
    if world > 1 and isinstance(spec, dict):
        raise StageError("train.device_map as a mapping splits one model over GPUs; it cannot be combined with DDP "
                         "(accelerate launch --num_processes > 1); use device_map: auto")  # fmt: skip
    if world > 1 and cuda and spec == "auto":  # DDP: each process holds a full replica on its own GPU
        spec = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    try:
        return dtype, modeling.resolve_device_map(spec)
    except (RuntimeError, ValueError) as e:
        raise StageError(str(e)) from None


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
        neftune_noise_alpha=t.neftune_alpha or None,
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
        report_to="none",  # MLflow goes through llmops.tracking: its failures must not stop training
        seed=seed,
        data_seed=seed,
        use_cpu=not cuda,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        remove_unused_columns=False,  # our samples are token-budget batches, not model kwargs
        save_only_model=False,
    )


# ---------------------------------------------------------------- outputs


def sort_adapter_config(folder: Path) -> None:
    """peft writes target_modules from a set, in an order that changes with PYTHONHASHSEED: sorted, the file (and
    so the adapter's DVC hash) depends on the params only."""
    f = folder / "adapter_config.json"
    cfg = json.loads(f.read_text(encoding="utf-8"))
    for key in ("target_modules", "exclude_modules", "modules_to_save"):
        if isinstance(cfg.get(key), list):
            cfg[key] = sorted(cfg[key])
    io.write_json(f, cfg)


def export(final: Path, paths: config.Paths) -> None:
    """`run_dir/final/` → the stage outputs: the adapter folder, metrics, curve and speed (each replaced atomically)."""
    with io.atomic_dir(paths.adapter_dir) as tmp:
        for f in final.iterdir():
            if f.name not in FINAL_FILES:
                shutil.copyfile(f, tmp / f.name)  # content only: no mtimes or modes in what DVC hashes
    for name, key in FINAL_FILES.items():
        io.write_text(getattr(paths, key), (final / name).read_text(encoding="utf-8"))


# ---------------------------------------------------------------- main


def main(params_file: str = "params.yaml") -> dict:
    t0 = time.perf_counter()
    p = config.load(params_file, "train", "preprocess")
    t, paths, max_len = p.train, p.paths, p.preprocess.max_seq_len
    world, rank0 = processes()
    compute_dtype, device_map = resolve_compute(t, world)
    logger, base_dir = log.get("train"), Path(paths.base_dir)
    modeling.require_model_dir(base_dir)
    files = {"train": Path(paths.processed_dir) / "train.jsonl", "synthetic": Path(paths.synthetic_train),
             "val": Path(paths.processed_dir) / "val.jsonl"}  # fmt: skip
    for f in files.values():
        if not f.exists():
            raise StageError(f"{f} missing: run `dvc repro preprocess synthetic` first")
    seed_rows, synthetic_rows = io.read_jsonl(files["train"]), io.read_jsonl(files["synthetic"])
    val_rows = io.read_jsonl(files["val"])
    if not val_rows:
        raise StageError(f"{files['val']} is empty: eval needs a val split (preprocess.val_frac > 0)")
    if not seed_rows and not (synthetic_rows and t.synthetic_repeats):
        raise StageError(f"nothing to train on: {files['train']} is empty and train.synthetic_repeats adds no rows")
    modeling.check_target_modules(base_dir, t.target_modules)
    run_params = {k: v for k, v in config.asdict(t).items() if k != "mlflow_experiment"}  # bookkeeping, not the model
    key = checkpoints.run_key(run_params, p.seed, max_len, base_dir, list(files.values()), world)
    root = Path(paths.checkpoint_dir)
    run_dir, final = checkpoints.open_run(root, key), root / key / checkpoints.FINAL
    if (final / "metrics.json").exists():  # this exact run already finished: export it again, don't train
        if rank0:
            export(final, paths)
            checkpoints.prune(root)
            logger.info("reexported", run_key=key, adapter=paths.adapter_dir)
        return {**json.loads((final / "metrics.json").read_text()), **json.loads((final / "speed.json").read_text())}
    params = {**run_params, "seed": p.seed, "max_seq_len": max_len, "compute_dtype_resolved": compute_dtype,
              "run_key": key, "train_rows": len(seed_rows) + len(synthetic_rows), "val_rows": len(val_rows),
              "world_size": world}  # fmt: skip
    run = tracking.start(paths.mlflow_uri, t.mlflow_experiment, run_dir, params) if rank0 else None
    try:
        metrics = fit(p, base_dir, run_dir, run, (seed_rows, synthetic_rows, val_rows), (compute_dtype, device_map), t0)
        if rank0:
            export(final, paths)
            checkpoints.prune(root)  # only now: a failed run costs no earlier run
            if run:
                run.end(metrics, metrics["steps"])
            logger.info("done", **{k: metrics[k] for k in ("steps", "base_eval_loss", "eval_loss", "tokens_per_s")})
        return metrics
    finally:
        if run:
            run.end(None, 0)  # FAILED, unless ended above


def mix(seed_ex: list[dict], synthetic_ex: list[dict], repeats: int) -> dict:
    """Per source, the rows, the passes per epoch, the tokens one epoch holds and their share: metrics' `mix`."""
    parts = {"seed": (seed_ex, 1), "synthetic": (synthetic_ex, repeats)}
    tokens = {k: n * sum(len(e["input_ids"]) for e in ex) for k, (ex, n) in parts.items()}
    total = max(1, sum(tokens.values()))
    return {k: {"rows": len(ex), "passes": n, "tokens": tokens[k], "token_share": round(tokens[k] / total, 4)}
            for k, (ex, n) in parts.items()}  # fmt: skip


def fit(p, base_dir: Path, run_dir: Path, run, rows: tuple[list, list, list], compute: tuple[str, object], t0: float):
    """Train (or resume) under the Trainer; the main process writes the finished adapter, its curve, metrics and
    speed into `run_dir/final/` in one atomic step (so `final/` exists only for a finished run); returns
    metrics + speed."""
    from transformers import Trainer

    t, max_len, (compute_dtype, device_map) = p.train, p.preprocess.max_seq_len, compute
    rank0 = processes()[1]
    tokenizer = modeling.load_tokenizer(base_dir)
    eot = chat.end_of_turn_id(tokenizer)
    seed_ex, synthetic_ex = (packing.encode_rows(r, tokenizer, eot, max_len) for r in rows[:2])
    train_ds = packing.mix_batches(seed_ex, synthetic_ex, t.synthetic_repeats, t.tokens_per_batch, t.packing, p.seed)
    val_ds = packing.make_batches(packing.encode_rows(rows[2], tokenizer, eot, max_len), t.tokens_per_batch,
                                  t.packing, None)  # fmt: skip
    resume, data_mix = checkpoints.last_checkpoint(run_dir), mix(seed_ex, synthetic_ex, t.synthetic_repeats)
    log.get("train").info("data", mix=data_mix, val_rows=len(rows[2]), train_batches=len(train_ds),
                          run_dir=str(run_dir), resume=str(resume or ""))  # fmt: skip
    callbacks = tracking.callbacks(run)
    if t.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(t.early_stopping_patience, t.early_stopping_threshold))
    trainer = Trainer(model=build_model(base_dir, t, compute_dtype, device_map, p.seed),
                      args=training_args(t, run_dir, p.seed, compute_dtype), train_dataset=train_ds,
                      eval_dataset=val_ds, data_collator=packing.Collator(t.packing, tokenizer.pad_token_id),
                      compute_loss_func=packing.token_weighted_loss(val_ds),
                      processing_class=tokenizer, callbacks=callbacks)  # fmt: skip
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
            raise StageError(f"out of memory: lower train.tokens_per_batch ({t.tokens_per_batch}) or "
                             f"preprocess.max_seq_len ({max_len}), or set train.gradient_checkpointing: true") from e  # fmt: skip
        raise
    step, history = trainer.state.global_step, list(trainer.state.log_history)  # the curve: what each step logged
    last = next((e for e in reversed(history) if "eval_loss" in e), None)
    if last is None or last["step"] != step:  # the schedule made no eval at the last step
        last = {"step": step, **trainer.evaluate()}
        history.append(last)
    # Early stopping restored the best checkpoint: its loss, evaluated again, is the run's result (not in the curve).
    final_loss = trainer.evaluate()["eval_loss"] if t.early_stopping_patience else last["eval_loss"]
    if trainer.is_fsdp_enabled:  # every rank takes part in the save (FSDP gathers the shards)
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    losses = [e["loss"] for e in history if "loss" in e]
    metrics = {"method": t.method, "steps": step, "epochs": round(trainer.state.epoch or 0.0, 4),
               "base_eval_loss": base_loss, "eval_loss": final_loss,
               "train_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),  # mean of the last 10 steps
               "tokens_seen": trainer.state.num_input_tokens_seen,
               "resumed_from_step": int(resume.name.split("-")[1]) if resume else 0, "compute_dtype": compute_dtype,
               "machine": hardware.machine(), "train_rows": len(seed_ex) + len(synthetic_ex), "val_rows": len(rows[2]),
               "mix": data_mix}  # fmt: skip
    speed = {"tokens_per_s": tracking.session_rate(trainer),  # real tokens / optimizer-step time, this session
             "train_wall_s": round(result.metrics["train_runtime"], 2),  # this session, evals and saves included
             "stage_wall_s": round(time.perf_counter() - t0, 2)}  # fmt: skip
    with io.atomic_dir(run_dir / checkpoints.FINAL) if rank0 else _scratch(run_dir) as tmp:
        trainer.save_model(str(tmp))
        if not rank0:
            return {}
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle holding run paths: never shipped
        sort_adapter_config(tmp)
        tokenizer.save_pretrained(tmp)
        io.write_json(tmp / "train_provenance.json", {
            "method": t.method, "compute_dtype": compute_dtype, "base_dir": str(base_dir),
            "base_provenance": modeling.read_provenance(base_dir),
            "seed": p.seed, "train": config.asdict(t), "eot_id": eot,
        })  # fmt: skip
        io.write_text(tmp / "curve.csv", tracking.curve_csv(history, base_loss))
        io.write_json(tmp / "metrics.json", metrics)
        io.write_json(tmp / "speed.json", speed)
    return {**metrics, **speed}


@contextlib.contextmanager
def _scratch(run_dir: Path):
    """Non-main DDP/FSDP ranks join save_model's collectives but write nowhere that matters."""
    with tempfile.TemporaryDirectory(dir=run_dir) as d:
        yield Path(d)


if __name__ == "__main__":
    stage.run("train", main, __doc__)
