"""merge: fold the LoRA adapter into 16-bit weights → a plain HF model folder that vLLM serves.

    python -m stages.merge [--params params.yaml]

Never merges into the 4-bit model: merging there re-quantizes W+BA to nf4, the most reported cause of
"the merged model is worse than the adapter". `merge.base_weights` picks the 16-bit weights:
  original     the base's own W16 weights (default);
  dequantized  the base quantized to nf4 as in training and dequantized back: the weights the adapter saw.
The merged folder is saved to a staging dir, reloaded from disk (what is checked is what ships) and its
logits are compared on the first `merge.parity_samples` val rows, at assistant positions (the positions
that predict an assistant token, i.e. where the loss is taken), with:
  unmerged  the same 16-bit base + the adapter as a side branch: only rounding may differ, so this catches a
            broken merge or save (thresholds merge.max_logit_abs_diff, merge.max_kl);
  trained   the nf4 base + adapter that training ran (qlora only): also differs by the nf4 quantization error
            when base_weights=original, so the base's own nf4-vs-16-bit gap is measured on the same samples
            (`quantization_gap`) and only the excess KL is bounded (merge.max_excess_kl_vs_trained).
Figures go to `paths.merge_metrics`; past a threshold the stage fails and `paths.merged_dir` is not touched.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from llmops import chat, config, io, log, modeling


class MergeError(RuntimeError):
    pass


def read_adapter(adapter_dir: Path, base_dir: Path) -> dict:
    """The adapter's train provenance, after checking the contract files and that it was trained on this base."""
    modeling.require_adapter_dir(adapter_dir)
    prov = json.loads((adapter_dir / "train_provenance.json").read_text(encoding="utf-8"))
    base_prov = json.loads((base_dir / "provenance.json").read_text(encoding="utf-8"))
    if prov.get("base_provenance") != base_prov:
        raise MergeError(f"{adapter_dir} was trained on another base than {base_dir} (provenance differs); rerun train")
    return prov


def load_base16(base_dir: Path, base_weights: str, prov: dict, dtype: str):
    """The 16-bit base to merge into, held in `dtype`: W16 as shipped, or nf4-quantized (as in training)
    then dequantized."""
    if base_weights == "original":
        return modeling.load_model(base_dir, quantize_4bit=False, dtype=dtype)
    if prov["method"] != "qlora":
        raise MergeError("merge.base_weights=dequantized needs a qlora adapter (this one trained on 16-bit weights)")
    model = modeling.load_model(base_dir, quantize_4bit=True, dtype=prov["compute_dtype"])
    return model.dequantize(dtype=modeling.torch_dtype(dtype)).to(modeling.torch_dtype(dtype))  # + norms/embeddings


def with_adapter(model, adapter_dir: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir).eval()


def merge_adapter(base, adapter_dir: Path):
    """W16 + scale·BA in place (safe_merge refuses NaN/inf results); returns the plain transformers model."""
    return with_adapter(base, adapter_dir).merge_and_unload(safe_merge=True)


def save_merged(model, tokenizer, eot_id: int, dtype: str, out: Path) -> list[int]:
    """`dtype` safetensors + tokenizer/template + a generation config whose eos ids include end-of-turn."""
    model.to(modeling.torch_dtype(dtype))  # one rounding, after W + BA was summed in the compute dtype
    model.config.dtype = dtype
    gen = model.generation_config
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    gen.eos_token_id = sorted({e for e in eos if e is not None} | {eot_id})
    if gen.pad_token_id is None:
        gen.pad_token_id = eot_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return gen.eos_token_id


def parity_samples(rows: list[dict], tokenizer, eot_id: int, n: int) -> list[chat.Encoded]:
    if not rows:
        raise MergeError("the val split is empty: no rows for the parity check")
    return [chat.encode(tokenizer, r["messages"], eot_id) for r in rows[:n]]


@torch.inference_mode()
def assistant_logits(model, samples: list[chat.Encoded], desc: str) -> list[torch.Tensor]:
    """float32 logits at the positions that predict assistant tokens, one [n_pos, vocab] tensor per sample."""
    device = next(model.parameters()).device
    out = []
    for enc in tqdm(samples, desc=desc, leave=False):
        logits = model(input_ids=torch.tensor([enc.input_ids], device=device)).logits[0, :-1]
        mask = torch.tensor(enc.labels[1:], device=device) != chat.IGNORE_INDEX
        out.append(logits[mask].float().cpu())
    return out


def compare(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict[str, float]:
    """|Δ logit| max/mean, mean KL(ref ‖ got) per position, top-1 agreement: all over assistant positions."""
    n = sum(r.shape[0] for r in ref)
    abs_max, abs_sum, kl_sum, agree = torch.tensor(0.0), 0.0, 0.0, 0.0
    for r, g in zip(ref, got, strict=True):
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
    }


def check(figures: dict[str, float], max_abs: float, max_kl: float, what: str) -> list[str]:
    """Threshold failures as messages naming the param; `not x <= t` also fails on NaN."""
    fails = []
    if not figures["max_logit_abs_diff"] <= max_abs:
        fails.append(f"{what}: max |Δlogit| {figures['max_logit_abs_diff']:.4g} > merge.max_logit_abs_diff {max_abs}")
    if not figures["mean_kl"] <= max_kl:
        fails.append(f"{what}: mean KL {figures['mean_kl']:.4g} > merge.max_kl {max_kl}")
    return fails


def main(params_file: str = "params.yaml") -> dict:
    p = config.load(params_file, "merge")
    m, paths = p.merge, p.paths
    logger = log.get("merge")
    base_dir, adapter_dir = Path(paths.base_dir), Path(paths.adapter_dir)
    modeling.require_model_dir(base_dir)  # before any work: a missing or truncated base in one line
    prov = read_adapter(adapter_dir, base_dir)
    method = prov["method"]
    dtype = prov["base_provenance"].get("dtype", "bfloat16")  # merged weights keep the base's 16-bit dtype
    # Merge and compare in fp32 where bf16 is emulated (AVX2 CPUs: also far faster), else in bf16/fp16.
    compute = modeling.resolve_dtype("auto")
    tokenizer = modeling.load_tokenizer(adapter_dir)  # the tokenizer + template training used
    eot = prov["eot_id"]
    val_file = Path(paths.processed_dir) / "val.jsonl"
    if not val_file.exists():
        raise MergeError(f"{val_file} missing: run `dvc repro preprocess`")
    samples = parity_samples(io.read_jsonl(val_file), tokenizer, eot, m.parity_samples)
    logger.info("merge", method=method, base_weights=m.base_weights, dtype=dtype, compute_dtype=compute,
                parity_samples=len(samples))  # fmt: skip

    def logits_of(load, desc: str) -> list[torch.Tensor]:
        model = load()  # one model in memory at a time: a GPU box holds one 16-bit 8B copy, not three
        out = assistant_logits(model, samples, desc)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return out

    base16 = lambda: load_base16(base_dir, m.base_weights, prov, compute)  # noqa: E731
    with io.atomic_dir(paths.merged_dir) as staging:
        eos = save_merged(merge_adapter(base16(), adapter_dir), tokenizer, eot, dtype, staging)
        got = logits_of(lambda: modeling.load_model(staging, quantize_4bit=False, dtype=compute).eval(), "merged")
        figures = {"vs_unmerged": compare(logits_of(lambda: with_adapter(base16(), adapter_dir), "unmerged"), got)}
        fails = check(figures["vs_unmerged"], m.max_logit_abs_diff, m.max_kl, "merged vs unmerged")
        if method == "qlora":
            nf4 = lambda: modeling.load_model(base_dir, quantize_4bit=True, dtype=prov["compute_dtype"])  # noqa: E731
            figures["vs_trained"] = compare(logits_of(lambda: with_adapter(nf4(), adapter_dir), "4-bit+adapter"), got)
            # The base's own nf4 error, no adapter: the floor under vs_trained that no merge can go below.
            figures["quantization_gap"] = compare(logits_of(nf4, "4-bit base"), logits_of(base16, "16-bit base"))
            excess = figures["vs_trained"]["mean_kl"] - figures["quantization_gap"]["mean_kl"]
            figures["vs_trained"]["excess_kl"] = excess
            if not excess <= m.max_excess_kl_vs_trained:
                fails.append(
                    f"merged vs 4-bit+adapter (trained): mean KL {figures['vs_trained']['mean_kl']:.4g} exceeds the "
                    f"base's own nf4 gap {figures['quantization_gap']['mean_kl']:.4g} by {excess:.4g} > "
                    f"merge.max_excess_kl_vs_trained {m.max_excess_kl_vs_trained}"
                )
        metrics = {
            **figures,
            "positions": "assistant",
            "n_samples": len(samples),
            "n_positions": sum(g.shape[0] for g in got),
            "passed": not fails,
        }
        io.write_json(paths.merge_metrics, metrics)
        logger.info("parity", **{f"{k}.{kk}": round(v, 6) for k, f in figures.items() for kk, v in f.items()})
        if fails:
            raise MergeError(
                "parity check failed: " + "; ".join(fails) + f"; {paths.merged_dir} left untouched"
                f" (figures in {paths.merge_metrics})"
            )
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    try:
        main(args.params)
    except (config.ParamsError, MergeError, io.DataFileError, modeling.ModelLoadError, FileNotFoundError) as e:
        sys.exit(f"merge: error: {e}")
