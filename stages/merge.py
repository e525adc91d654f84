"""merge: fold the LoRA adapter into 16-bit weights → a plain HF model folder that vLLM serves.

    python -m stages.merge [--params params.yaml]

Never merges into the 4-bit model: merging there re-quantizes W+BA to nf4, the most reported cause of
"the merged model is worse than the adapter". `merge.base_weights` picks the 16-bit weights:
  original     the base's own W16 weights (default);
  dequantized  the base quantized to nf4 as in training and dequantized back: the weights the adapter saw.
W + scale·BA is summed in fp32 and rounded once to the base's dtype. The merged folder is saved to a staging dir,
reloaded from disk (what is checked is what ships) and compared on the first `merge.parity_samples` val rows, at
the positions that predict an assistant token (where the loss is taken). All of it computes in fp32 whatever the
machine: a bf16 comparison would measure the compute dtype's own rounding (max |Δlogit| 0.3 in fp32 vs 1.3 in
bf16 on the same merge), so the gate would pass on one machine and fail on another.
  gate       vs_unmerged: the same 16-bit base + the adapter as a side branch. Only the final rounding of W + BA
             may differ, so mean KL(unmerged ‖ merged) must stay under merge.max_kl: a broken merge is orders of
             magnitude above it.
  reported   qlora: vs_trained, the nf4 base + adapter as training ran it (in its compute dtype), and
             quantization_gap, the base's own nf4-vs-16-bit gap on the same rows: what no merge into the original
             weights can remove. `loss` holds each model's mean NLL on these rows (nats/token).
Figures go to `paths.merge_metrics`, also when the gate fails; then `paths.merged_dir` is not replaced.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch
import torch.nn.functional as F

from llmops import chat, config, hardware, io, log, modeling, stage
from llmops.stage import StageError

PARITY_DTYPE = "float32"  # every comparison, whatever the machine: see the module docstring


def read_adapter(adapter_dir: Path, base_dir: Path) -> dict:
    """The adapter's train provenance, after checking the contract files and that it was trained on this base."""
    modeling.require_adapter_dir(adapter_dir)
    prov = modeling.read_provenance(adapter_dir, "train_provenance.json", modeling.FIX_TRAIN)
    base_prov = modeling.read_provenance(base_dir)
    if prov.get("base_provenance") != base_prov:
        raise StageError(f"{adapter_dir} was trained on another base than {base_dir} (provenance differs); rerun train")
    return prov


def load_base16(base_dir: Path, base_weights: str, prov: dict):
    """The 16-bit base to merge into, held in fp32: W16 as shipped, or nf4-quantized (as in training) then
    dequantized."""
    if base_weights == "original":
        return modeling.load_model(base_dir, quantize_4bit=False, dtype=PARITY_DTYPE)
    if prov["method"] != "qlora":
        raise StageError("merge.base_weights=dequantized needs a qlora adapter (this one trained on 16-bit weights)")
    model = modeling.load_model(base_dir, quantize_4bit=True, dtype=prov["compute_dtype"])
    return model.dequantize(dtype=torch.float32).float()  # + norms/embeddings


def with_adapter(model, adapter_dir: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir).eval()


def merge_adapter(base, adapter_dir: Path):
    """W16 + scale·BA in place (safe_merge refuses NaN/inf results); returns the plain transformers model."""
    return with_adapter(base, adapter_dir).merge_and_unload(safe_merge=True)


def save_merged(model, tokenizer, eot_id: int, dtype: str, out: Path, g: config.Generation) -> list[int]:
    """`dtype` safetensors + tokenizer/template + a generation config whose eos ids include end-of-turn and
    whose sampling defaults are `merge.generation` (vLLM answers with them when a request leaves one out)."""
    model.to(modeling.torch_dtype(dtype))  # one rounding, after W + BA was summed in fp32
    model.config.dtype = dtype
    eos = modeling.set_stop_ids(model, eot_id)
    gen = model.generation_config
    gen.do_sample = g.temperature > 0  # transformers refuses to save temperature/top_p on a greedy config
    gen.temperature, gen.top_p = (g.temperature, g.top_p) if gen.do_sample else (None, None)
    gen.repetition_penalty, gen.max_new_tokens = g.repetition_penalty, g.max_new_tokens
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return eos


def parity_samples(rows: list[dict], tokenizer, eot_id: int, n: int) -> list[chat.Encoded]:
    if not rows:
        raise StageError("the val split is empty: no rows for the parity check")
    return [chat.encode(tokenizer, r["messages"], eot_id) for r in rows[:n]]


def mean_nll(scored: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Token-weighted mean NLL (nats/token) of the assistant tokens."""
    total = sum(F.cross_entropy(lg, tg, reduction="sum").item() for lg, tg in scored)
    return total / sum(tg.numel() for _, tg in scored)


def compare(ref: list, got: list) -> dict[str, float]:
    """|Δ logit| max/mean, mean KL(ref ‖ got) per position, top-1 agreement, loss difference (got - ref):
    all over assistant positions."""
    n = sum(r.shape[0] for r, _ in ref)
    abs_max, abs_sum, kl_sum, agree = torch.tensor(0.0), 0.0, 0.0, 0.0
    for (r, _), (g, _) in zip(ref, got, strict=True):
        d = (r - g).abs()
        abs_max = torch.maximum(abs_max, d.max())  # torch, not max(): a NaN must propagate, not vanish
        abs_sum += d.mean(-1).sum().item()
        lr, lg = torch.log_softmax(r, -1), torch.log_softmax(g, -1)
        kl_sum += (lr.exp() * (lr - lg)).sum(-1).sum().item()
        agree += (r.argmax(-1) == g.argmax(-1)).sum().item()
    return {
        "max_logit_abs_diff": abs_max.item(),
        "mean_logit_abs_diff": abs_sum / n,
        "mean_kl": kl_sum / n,
        "top1_agreement": agree / n,
        "loss_diff": mean_nll(got) - mean_nll(ref),
    }


def gate(figures: dict[str, float], max_kl: float) -> str | None:
    """The failure message, or None; `not x <= t` also fails on NaN."""
    if not figures["mean_kl"] <= max_kl:
        return (
            f"merged vs unmerged: mean KL {figures['mean_kl']:.4g} > merge.max_kl {max_kl} (top-1 agreement "
            f"{figures['top1_agreement']:.3f}, max |Δlogit| {figures['max_logit_abs_diff']:.3g}, computed in fp32)"
        )
    return None


def main(params_file: str = "params.yaml") -> dict:
    p = config.load(params_file, "merge")
    m, paths = p.merge, p.paths
    logger = log.get("merge")
    base_dir, adapter_dir = Path(paths.base_dir), Path(paths.adapter_dir)
    modeling.require_model_dir(base_dir)  # before any work: a missing or truncated base in one line
    prov = read_adapter(adapter_dir, base_dir)
    method = prov["method"]
    dtype = prov["base_provenance"].get("dtype", "bfloat16")  # merged weights keep the base's 16-bit dtype
    tokenizer = modeling.load_tokenizer(adapter_dir)  # the tokenizer + template training used
    eot = prov["eot_id"]
    val_file = Path(paths.processed_dir) / "val.jsonl"
    if not val_file.exists():
        raise StageError(f"{val_file} missing: run `dvc repro preprocess`")
    samples = parity_samples(io.read_jsonl(val_file), tokenizer, eot, m.parity_samples)
    logger.info("merge", method=method, base_weights=m.base_weights, dtype=dtype, parity_dtype=PARITY_DTYPE,
                parity_samples=len(samples))  # fmt: skip

    def scored(load, desc: str) -> list:
        model = load()  # one model in memory at a time: a GPU box holds one 8B copy, not three
        out = list(modeling.assistant_positions(model, samples, desc=desc))
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return out

    base16 = lambda: load_base16(base_dir, m.base_weights, prov)  # noqa: E731
    with io.atomic_dir(paths.merged_dir) as staging:
        eos = save_merged(merge_adapter(base16(), adapter_dir), tokenizer, eot, dtype, staging, m.generation)
        got = scored(lambda: modeling.load_model(staging, quantize_4bit=False, dtype=PARITY_DTYPE).eval(), "merged")
        unmerged = scored(lambda: with_adapter(base16(), adapter_dir), "unmerged")
        figures = {"vs_unmerged": compare(unmerged, got)}
        loss = {"merged": mean_nll(got), "unmerged": mean_nll(unmerged)}
        if method == "qlora":
            nf4 = lambda: modeling.load_model(base_dir, quantize_4bit=True, dtype=prov["compute_dtype"])  # noqa: E731
            trained = scored(lambda: with_adapter(nf4(), adapter_dir), "4-bit+adapter")
            figures["vs_trained"] = compare(trained, got)
            # The base's own nf4 error, no adapter: the floor under vs_trained that no merge into W16 removes.
            base4, w16 = scored(nf4, "4-bit base"), scored(base16, "16-bit base")
            figures["quantization_gap"] = compare(w16, base4)
            loss.update(trained=mean_nll(trained), base_4bit=mean_nll(base4), base_16bit=mean_nll(w16))
        failure = gate(figures["vs_unmerged"], m.max_kl)
        metrics = {
            **figures,
            "loss": loss,
            "positions": "assistant",
            "n_samples": len(samples),
            "n_positions": sum(g.shape[0] for g, _ in got),
            "passed": failure is None,
            "parity_dtype": PARITY_DTYPE,
            "train_compute_dtype": prov["compute_dtype"],
            "machine": hardware.machine(),
        }
        io.write_json(paths.merge_metrics, metrics)
        logger.info("parity", **{f"{k}.{kk}": round(v, 6) for k, f in figures.items() for kk, v in f.items()})
        if failure:
            raise StageError(f"parity check failed: {failure}; {paths.merged_dir} not replaced (figures in "
                             f"{paths.merge_metrics})")  # fmt: skip
        io.write_json(
            staging / "merge_provenance.json",
            {
                "method": method,
                "base_weights": m.base_weights,
                "dtype": dtype,
                "eos_token_id": eos,
                "adapter_files": {f.name: io.sha256_file(f) for f in sorted(adapter_dir.iterdir()) if f.is_file()},
                "train_provenance": prov,
            },
        )
    logger.info("done", out=paths.merged_dir)
    return metrics


if __name__ == "__main__":
    stage.run("merge", main, __doc__)
