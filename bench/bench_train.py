"""Training throughput: our train stage vs a bare QLoRA step (its roofline) and TRL's SFTTrainer, same model and LoRA.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_train.py [--params params.yaml] [--rows 40] [--val-rows 16]
                                                           [--trl-default-rows 2] [--pairs 3] [--json out.json]

Needs `dvc repro preprocess synthetic` (reads `paths.processed_dir` and `paths.synthetic_train`). Subsamples
(seeded) `--rows` train rows (seed + synthetic mixed as in the stage) and `--val-rows` val rows so it runs in
minutes on a 2-core CPU. Arms, each for one epoch over the same rows with `train.*` LoRA settings:
  ours          stages.train.main() on the subsample (params.yaml train section, evals/saves only at the end);
                the vocabulary head runs only at the positions that predict a label (`packing.logit_positions`)
  ours_full_head  the same with every position through the head and its cross-entropy (the stage before
                2026-12-02): what trimming the head buys, side by side
  ours_eager    the same with `train.compile: none` (no decoder layer compiled; the stage before 2026-12-03):
                what regional compilation buys; ours and ours_eager run `--pairs` times each, interleaved, and
                report their median run (a shared VM's speed drifts by more than the difference)
  bare          the roofline of one training step of the same model: `stages.train.build_model` (nf4 + double
                quant, LoRA on `train.target_modules`, the compute dtype `auto` picks), AdamW, a dense 8x256 batch
                of random tokens, a plain loop: no Trainer, no data pipeline, no padding, no evals
  trl_default   SFTTrainer with only model path, messages dataset, peft config, output dir, epochs, max
                length (+ use_cpu without a GPU, else it refuses to start): its defaults include bf16 autocast, native
                on GPUs and AVX512-BF16/AMX CPUs (the fair comparison there, on every row) but emulated (~20-50x
                slower) on AVX2-only CPUs, where it runs `--trl-default-rows` rows only and reports throughput
  trl_fp32      SFTTrainer defaults + the model object our stage builds (same nf4/fp32 weights) and bf16=False:
                the one change that makes TRL's CPU numerics match ours
Before the arms, one untimed run of `ours` warms the process (kernel creation per matmul shape), so no arm pays
for going first.
Real tokens/s = non-padding tokens trained / summed optimizer-step time (forward, backward, optimizer; the
Trainer's end-of-training eval and checkpoint save excluded for every arm). `runtime_tokens_per_s` divides by
the whole train() wall time instead.
Eval loss: one function for all arms: assistant-token mean CE on the val subsample (examples run one at a time).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmops import chat, config, hardware, io, modeling, packing  # noqa: E402
from stages import train  # noqa: E402


def val_loss(model, examples: list[dict]) -> float:
    """Token-weighted CE on assistant tokens, one example at a time (no packing, no padding)."""
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for e in examples:
            ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
            logits = model(input_ids=ids).logits[0, :-1].float()
            target = labels[0, 1:]
            mask = target != chat.IGNORE_INDEX
            total += torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum").item()
            n += int(mask.sum())
    return total / n


def matmul_peak(n: int = 1024, seconds: float = 2.0) -> dict[str, float]:
    """Measured dense matmul throughput (FLOP/s) per dtype with torch's current thread count: the ceiling
    a training step could reach on this machine."""
    out = {}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up (oneDNN kernel selection)
        reps, t0 = 0, time.perf_counter()
        while (dt := time.perf_counter() - t0) < seconds:
            a @ b
            reps += 1
        out[name] = 2 * n**3 * reps / dt
    return out


def train_flops(model_dir: str) -> tuple[float, float]:
    """(per trained token in the layers, per position through the head): ≈ 4·N for LoRA, forward 2N + backward
    through activations 2N (frozen weights get no gradient; the adapters' own FLOPs are < 1 % at r=16). A full
    step sends every token through the head; ours only the positions that predict a label."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    d, f, L, v = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    kv = d * c.num_key_value_heads // c.num_attention_heads
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f  # q,o + k,v + gate,up,down
    return 4.0 * L * per_layer, 4.0 * d * v


def head_share(p: config.Params, rows: list[dict]) -> float:
    """Positions the stage sends through the head per real token, over the batches it makes of `rows`."""
    tok = modeling.load_tokenizer(p.paths.base_dir)
    ex = packing.encode_rows(rows, tok, chat.end_of_turn_id(tok), p.preprocess.max_seq_len)
    batches = packing.make_batches(ex, p.train.tokens_per_batch, p.train.packing, p.seed)
    col = packing.Collator(p.train.packing, tok.pad_token_id)
    kept = sum(len(b["labels"]) * len(b["logits_to_keep"]) for b in (col([x]) for x in batches))
    return kept / sum(len(e["input_ids"]) for e in ex)


def step_timer():
    """Sums on_step_begin → on_step_end: the clock the train stage's tokens_per_s uses."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        total = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.total += time.perf_counter() - self.t

    return StepTimer()


def lora_config(t: config.Train):
    from peft import LoraConfig

    return LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                      target_modules=list(t.target_modules), task_type="CAUSAL_LM")  # fmt: skip


def run_ours(params_file: Path, work: Path, train_rows: list[dict], val_rows: list[dict], name: str = "ours") -> dict:
    raw = yaml.safe_load(params_file.read_text())
    for key in (
        "processed_dir",
        "synthetic_train",
        "adapter_dir",
        "checkpoint_dir",
        "train_metrics",
        "train_curve",
        "train_speed",
    ):
        raw["paths"][key] = str(work / name / key)
    raw["paths"]["mlflow_uri"] = f"sqlite:///{work / name / 'mlflow.db'}"
    raw["train"].update(epochs=1, max_steps=-1, eval_every=10**6, save_every=10**6, early_stopping_patience=0)
    if name == "ours_eager":
        raw["train"]["compile"] = "none"
    io.write_jsonl(work / name / "processed_dir/train.jsonl", train_rows)
    io.write_jsonl(work / name / "processed_dir/val.jsonl", val_rows)
    io.write_jsonl(work / name / "synthetic_train", [])
    bench_params = work / name / "params.yaml"
    bench_params.write_text(yaml.safe_dump(raw, sort_keys=False))
    trim = packing.logit_positions
    if name == "ours_full_head":  # every position but the last (which predicts nothing) through the head
        packing.logit_positions = lambda labels: torch.arange(labels.shape[1] - 1)
    try:
        m = train.main(str(bench_params))
    finally:
        packing.logit_positions = trim
    step_s = m["tokens_seen"] / m["tokens_per_s"]  # the stage's own clock: summed optimizer-step time
    return {
        "tokens": m["tokens_seen"],
        "step_s": step_s,
        "train_s": m["train_wall_s"],
        "adapter": work / name / "adapter_dir",
    }


def bare_setup(p: config.Params, dtype: str):
    """The bare loop's model (`stages.train.build_model`: nf4 + LoRA as `train.*`, eager: `train.compile` is
    the stage's, not the roofline's) and its AdamW, on the CPU."""
    torch.manual_seed(p.seed)
    t = p.train.model_copy(update={"compile": "none"})
    model = train.build_model(Path(p.paths.base_dir), t, dtype, {"": "cpu"}, p.seed).train()
    return model, torch.optim.AdamW([w for w in model.parameters() if w.requires_grad], lr=p.train.lr)


def bare_step(model, opt, ids) -> float:
    """Seconds of one forward → backward → AdamW step on a dense batch of token ids (labels = the ids)."""
    t = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def paired(pairs: int, run) -> tuple[dict, dict]:
    """`ours` and `ours_eager` `pairs` times each, alternating which goes first, each reported by its median run
    (+ every run's tokens/s): on a shared 2-core VM one arm's rate moves ±15 % between minutes (2026-12-03: eager
    237, 214, 248 and compiled 316, 316, 278 tok/s interleaved; one unpaired run of each had them equal)."""
    runs: dict[str, list[dict]] = {"ours": [], "ours_eager": []}
    for i in range(pairs):
        for name in ("ours", "ours_eager") if i % 2 else ("ours_eager", "ours"):
            runs[name].append(run(name, i))
    out = []
    for name in ("ours", "ours_eager"):
        rates = [r["tokens"] / r["step_s"] for r in runs[name]]
        median = sorted(range(len(rates)), key=rates.__getitem__)[len(rates) // 2]
        out.append({**runs[name][median], "runs_tokens_per_s": [round(x, 1) for x in rates]})
    return out[0], out[1]


def run_bare(p: config.Params, dtype: str, steps: int = 8, batch: tuple[int, int] = (8, 256)) -> dict:
    """Tokens/s of the plain loop forward → backward → AdamW step on a dense batch (2 warm-up steps not timed)."""
    model, opt = bare_setup(p, dtype)
    ids = torch.randint(100, 40000, batch)
    for _ in range(2):  # warm-up, not timed
        bare_step(model, opt, ids)
    elapsed = sum(bare_step(model, opt, ids) for _ in range(steps))
    return {"tokens": steps * batch[0] * batch[1], "step_s": elapsed, "train_s": elapsed}


def run_trl(p: config.Params, work: Path, rows: list[dict], name: str, model_obj=None) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    # trl_default: use_cpu only where there is no GPU (TRL's bf16 default refuses to start on a CPU without it);
    # trl_fp32: bf16 off, its one change from the defaults.
    kw = {"use_cpu": not torch.cuda.is_available()} if model_obj is None else {"bf16": False}
    args = SFTConfig(output_dir=str(work / name), num_train_epochs=1, max_length=p.preprocess.max_seq_len,
                     report_to="none", **kw)  # fmt: skip
    ds = Dataset.from_list([{"messages": r["messages"]} for r in rows])
    model = model_obj if model_obj is not None else p.paths.base_dir
    timer = step_timer()
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, peft_config=lora_config(p.train), callbacks=[timer])
    tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])  # what it trains on, padding excluded
    out = trainer.train()
    return {"tokens": tokens, "step_s": timer.total, "train_s": out.metrics["train_runtime"], "model": trainer.model}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--val-rows", type=int, default=16)
    ap.add_argument("--trl-default-rows", type=int, default=2, help="0 skips the bf16-autocast TRL arm")
    ap.add_argument("--pairs", type=int, default=3, help="runs of ours and ours_eager each, interleaved (median)")
    ap.add_argument("--json", default=str(ROOT / "bench/results/train.json"), help="also write the results here")
    a = ap.parse_args()
    if a.pairs < 1:
        ap.error("--pairs must be at least 1")
    t0 = time.perf_counter()
    params_file = Path(a.params)
    p = config.load(params_file, "train", "preprocess")
    paths = p.paths
    rows = io.read_jsonl(Path(paths.processed_dir) / "train.jsonl") + io.read_jsonl(Path(paths.synthetic_train))
    random.Random(p.seed).shuffle(rows)
    val = io.read_jsonl(Path(paths.processed_dir) / "val.jsonl")[: a.val_rows]
    rows = rows[: a.rows]
    tok = modeling.load_tokenizer(paths.base_dir)
    eot = chat.end_of_turn_id(tok)
    val_ex = packing.encode_rows(val, tok, eot, p.preprocess.max_seq_len)
    dtype, _ = train.resolve_compute(p.train, world=1)
    quantize = p.train.method == "qlora"
    res: dict = {"rows": len(rows), "val_rows": len(val), "method": p.train.method, "compute_dtype": dtype,
                 "threads": torch.get_num_threads(), "machine": hardware.machine()}  # fmt: skip
    if hardware.cpu_has_native_bf16() or torch.cuda.is_available():
        a.trl_default_rows = len(rows)  # TRL's bf16 default is native here: the fair arm, on every row
    res["peak_flops"] = matmul_peak()
    layers, head = train_flops(paths.base_dir)
    res["head_positions_per_token"] = head_share(p, rows)
    res["flops_per_token"] = {arm: layers + head for arm in ARMS}  # a dense step: every position through the head
    res["flops_per_token"]["ours"] = layers + head * res["head_positions_per_token"]

    try:
        run_arms(a, p, params_file, rows, val, val_ex, dtype, quantize, res)
    finally:  # a failing arm still reports the ones that finished
        report(res, t0, a.json)


def run_arms(a, p, params_file, rows, val, val_ex, dtype, quantize, res) -> None:
    """ours, ours_full_head, ours_eager, bare, then trl_fp32 and trl_default; each adds its entry to `res` when done."""
    paths = p.paths
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        # Untimed: a process's first training run pays one-off costs (oneDNN builds a kernel per new matmul
        # shape, allocator growth) that the arms after it do not. Measured on the AVX512-BF16 box, whichever
        # arm ran first was 10-15 % slower (full head first 217.8 tok/s, then ours 257.9 and ours again 239.3).
        run_ours(params_file, work, rows, val, "warmup")
        ours, eager = paired(a.pairs, lambda name, i: run_ours(params_file, work / str(i), rows, val, name))
        full = run_ours(params_file, work, rows, val, "ours_full_head")
        res["ours_full_head"] = {k: full[k] for k in ("tokens", "step_s", "train_s")}
        res["ours_eager"] = {k: eager[k] for k in ("tokens", "step_s", "train_s", "runs_tokens_per_s")}
        res["bare"] = run_bare(p, dtype)
        from peft import PeftModel

        base = modeling.load_model(paths.base_dir, quantize_4bit=quantize, dtype=dtype, device_map="cpu")
        res["base_eval_loss"] = val_loss(base, val_ex)
        res["ours"] = {k: ours[k] for k in ("tokens", "step_s", "train_s", "runs_tokens_per_s")}
        res["ours"]["eval_loss"] = val_loss(PeftModel.from_pretrained(base, ours["adapter"]), val_ex)
        del base
        model = modeling.load_model(paths.base_dir, quantize_4bit=quantize, dtype=dtype, device_map="cpu")
        fp32 = run_trl(p, work, rows, "trl_fp32", model_obj=model)
        res["trl_fp32"] = {k: fp32[k] for k in ("tokens", "step_s", "train_s")}
        res["trl_fp32"]["eval_loss"] = val_loss(fp32["model"], val_ex)
        del model, fp32
        if a.trl_default_rows:
            d = run_trl(p, work, rows[: a.trl_default_rows], "trl_default")
            res["trl_default"] = {"rows": a.trl_default_rows, **{k: d[k] for k in ("tokens", "step_s", "train_s")}}


ARMS = ("ours", "ours_full_head", "ours_eager", "bare", "trl_fp32", "trl_default")


def report(res: dict, t0: float, json_path: str | None) -> None:
    """Rates and ratios of whatever arms finished; printed and, with --json, written."""
    for arm in ARMS:
        if arm in res:
            res[arm]["tokens_per_s"] = res[arm]["tokens"] / res[arm]["step_s"]
            res[arm]["runtime_tokens_per_s"] = res[arm]["tokens"] / res[arm]["train_s"]
    if "ours" in res and "ours_full_head" in res:
        res["ratio_vs_full_head"] = res["ours"]["tokens_per_s"] / res["ours_full_head"]["tokens_per_s"]
    if "ours" in res and "ours_eager" in res:
        res["ratio_vs_eager"] = res["ours"]["tokens_per_s"] / res["ours_eager"]["tokens_per_s"]
    if "ours" in res and "bare" in res:
        res["ratio_vs_bare"] = res["ours"]["tokens_per_s"] / res["bare"]["tokens_per_s"]
    if "ours" in res and "trl_fp32" in res:
        res["ratio_vs_trl_fp32"] = res["ours"]["tokens_per_s"] / res["trl_fp32"]["tokens_per_s"]
    if "ours" in res and "trl_default" in res:
        res["ratio_vs_trl_default"] = res["ours"]["tokens_per_s"] / res["trl_default"]["tokens_per_s"]
    if "peak_flops" in res and "flops_per_token" in res:
        for arm in ARMS:
            if arm in res:
                achieved = res[arm]["tokens_per_s"] * res["flops_per_token"][arm]
                res[arm]["achieved_tflops"] = achieved / 1e12
                res[arm]["share_of_bf16_peak"] = achieved / res["peak_flops"]["bfloat16"]
                res[arm]["share_of_fp32_peak"] = achieved / res["peak_flops"]["float32"]
    res["bench_wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res, indent=2))
    if json_path:
        Path(json_path).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
