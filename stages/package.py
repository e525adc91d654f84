"""package: what a serving box pulls — merged weights + tokenizer + chat template + model card + hash manifest.

    python -m stages.package [--params params.yaml]

Input: `paths.merged_dir` (plain HF folder), `paths.base_dir/provenance.json`, `paths.train_metrics`,
`paths.merge_metrics`. Not `paths.eval_metrics`: an evaluate-only change (more samples, longer generations) must
rerun evaluate alone, not rebuild what a serving box pulls; eval results live in git (metrics/eval.json).
Output (`paths.package_dir`, written atomically): every merged file, `MODEL_CARD.md` and
`manifest.json` = sha256 + size of every other file, base provenance, a digest of the params that produced the
model, headline metrics and the serving defaults `python -m serve` starts vLLM with.

No git revision in the package: the stage runs before its results are committed (HEAD would name the parent
commit), and a `dvc repro -f` or run-cache restore on a later commit would make identical inputs produce a
different package hash. The commit that produced a package is the one whose dvc.lock records its md5.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from llmops import chat, config, io, log, modeling, stage
from llmops.stage import StageError

MANIFEST, CARD, TEMPLATE, GENCONFIG = "manifest.json", "MODEL_CARD.md", "chat_template.jinja", "generation_config.json"
SAMPLING = tuple(config.Generation.model_fields)  # the generation_config keys merge writes and vLLM reads
# Everything that decides the weights and the reported metrics; `paths` is left out so the digest is the same
# wherever the pipeline ran, `serve` because serving settings never change what was built.
DIGEST_SECTIONS = ("base", "preprocess", "synthetic", "train", "merge", "package")
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".joblib", ".ckpt")


def model_files(merged: Path) -> list[Path]:
    """The merged folder's files, refusing pickled weights and folders missing what vLLM needs."""
    files = sorted(f for f in merged.iterdir() if f.is_file() and not f.name.startswith("."))
    if bad := [f.name for f in files if f.suffix in PICKLES]:
        raise StageError(f"{merged}: pickled weights {bad} are never packaged (save with safetensors)")
    names = {f.name for f in files}
    missing = [n for n in ("config.json", GENCONFIG) if n not in names]
    missing += [] if any(n.endswith(".safetensors") for n in names) else ["*.safetensors"]
    missing += [] if names & {"tokenizer.json", "tokenizer.model"} else ["tokenizer.json"]
    if missing:
        raise StageError(f"{merged}: not a complete model folder, missing {missing} (run the merge stage)")
    return files


def serving_defaults(merged: Path, pkg: config.Package, tokenizer) -> dict:
    """Serving settings checked against the model: context fits, and generation stops at the end of a turn."""
    cfg = json.loads((merged / "config.json").read_text(encoding="utf-8"))
    limit = cfg.get("max_position_embeddings")
    if limit and pkg.max_model_len > limit:
        raise StageError(f"package.max_model_len={pkg.max_model_len} > the model's max_position_embeddings={limit}")
    gen = json.loads((merged / GENCONFIG).read_text(encoding="utf-8"))
    eos = modeling.stop_ids(gen.get("eos_token_id"))
    eot = chat.end_of_turn_id(tokenizer)
    if eot not in eos:
        # vLLM stops on generation_config's eos ids: without the end-of-turn token replies run to max_tokens.
        raise StageError(f"{merged / GENCONFIG}: eos_token_id {eos} lacks the end-of-turn id {eot}")
    return {
        "served_model_name": pkg.served_model_name,
        "max_model_len": pkg.max_model_len,
        "chat_template": TEMPLATE,
        "generation_config": GENCONFIG,
        "eos_token_id": eos,
        "end_of_turn_id": eot,
        "dtype": cfg.get("dtype") or cfg.get("torch_dtype"),
        # what vLLM answers with when a request leaves a field out (merge.generation); absent = vLLM's neutral default
        "sampling": {k: gen[k] for k in SAMPLING if k in gen},
    }


def headline(keys: tuple[str, ...], sources: dict[str, dict | None]) -> tuple[dict, list[str]]:
    """Look up `train.a.b` / `merge.a.b`; missing keys (or a missing file) become None and are listed."""
    values, missing = {}, []
    for key in keys:
        src, _, dotted = key.partition(".")
        if src not in ("train", "merge") or not dotted:
            raise StageError(f"package.headline_metrics: {key!r} must look like train.<key> or merge.<key.path>")
        node = sources.get(src)
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None or isinstance(node, (dict, list)):
            missing.append(key)
            node = None
        values[key] = node
    return values, missing


def params_digest(p: config.Params) -> str:
    data = {"seed": p.seed, **{s: config.asdict(getattr(p, s)) for s in DIGEST_SECTIONS}}
    return "sha256:" + hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def model_card(p: config.Params, base_prov: dict, serving: dict, metrics: dict, missing: list[str]) -> str:
    t, pre, syn = p.train, p.preprocess, p.synthetic
    sources = ", ".join(f"`{s.path}` ({s.format})" for s in pre.sources)
    params_rows = {
        "method": t.method,
        "lora_r / alpha / dropout": f"{t.lora_r} / {t.lora_alpha} / {t.lora_dropout}",
        "target_modules": ", ".join(t.target_modules),
        "lr / scheduler / warmup": f"{t.lr} / {t.scheduler} / {t.warmup_ratio}",
        "epochs / max_steps": f"{t.epochs} / {t.max_steps}",
        "tokens_per_batch x grad_accum": f"{t.tokens_per_batch} x {t.grad_accum}",
        "compute_dtype": t.compute_dtype,
        "max_seq_len": pre.max_seq_len,
        "merge.base_weights": p.merge.base_weights,
        "seed": p.seed,
    }
    lines = [
        f"# {serving['served_model_name']}",
        "",
        f"Fine-tuned from `{base_prov.get('source')}` ({', '.join(base_prov.get('architecture') or [])}, "
        f"{base_prov.get('parameters', 'n/a')} parameters, license {base_prov.get('license') or 'see base'}) "
        f"with {t.method.upper()}, adapter merged into {serving['dtype']} weights.",
        "",
        "## Intended use",
        "",
        p.package.intended_use or "Not stated.",
        "",
        "## Limitations",
        "",
        p.package.limitations or "Not stated.",
        "",
        "## Data",
        "",
        f"- conversations: {sources}; split by content hash (val {pre.val_frac}, test {pre.test_frac});"
        f" rows over {pre.max_seq_len} tokens rejected",
        f"- synthetic (train split only): generator `{syn.generator}`, at most {syn.max_rows} rows",
        "",
        "## Training parameters",
        "",
        "| param | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in params_rows.items()),
        "",
        "## Metrics",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {'n/a (missing)' if k in missing else v} |" for k, v in metrics.items()),
        "",
        "## Serving",
        "",
        f"- served model name `{serving['served_model_name']}`, max model len {serving['max_model_len']}",
        f"- chat template `{TEMPLATE}` (passed to vLLM with --chat-template); stops on eos ids"
        f" {serving['eos_token_id']} from `{GENCONFIG}` (end of turn {serving['end_of_turn_id']})",
        "- sampling defaults for fields a request leaves out: "
        + (", ".join(f"{k} {v}" for k, v in serving["sampling"].items()) or "vLLM's (temperature 1.0)"),
        "- `make serve` (or `python -m serve`) verifies every file against `manifest.json`, then starts vLLM;"
        " `python -m serve smoke` checks a live endpoint",
        "",
        f"Params digest `{params_digest(p)}`.",
        "",
    ]
    return "\n".join(lines)


def build(p: config.Params, out: Path, logger) -> dict:
    merged, pkg = Path(p.paths.merged_dir), p.package
    files = model_files(merged)
    tokenizer = modeling.load_tokenizer(merged, trust_remote_code=p.base.trust_remote_code)
    if not isinstance(tokenizer.chat_template, str):
        raise StageError(f"{merged}: no chat template (an instruct model needs one to be served)")
    serving = serving_defaults(merged, pkg, tokenizer)
    for f in files:
        shutil.copyfile(f, out / f.name)  # plain copy: content only, no mtimes/permissions in the package
    if not (out / TEMPLATE).exists():  # older tokenizers keep the template inside tokenizer_config.json
        io.write_text(out / TEMPLATE, tokenizer.chat_template)
    base_prov = modeling.read_provenance(p.paths.base_dir)
    base_prov.pop("files", None)  # the base's own file hashes say nothing about this package
    sources = {}
    for name, path in (("train", p.paths.train_metrics), ("merge", p.paths.merge_metrics)):
        try:
            sources[name] = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            logger.warning("metrics_file_missing", file=path)
    metrics, missing = headline(pkg.headline_metrics, sources)
    if missing:
        logger.warning("metrics_missing", keys=missing)
    io.write_text(out / CARD, model_card(p, base_prov, serving, metrics, missing))
    manifest = {
        "format": 1,
        "serving": serving,
        "base": base_prov,
        "params_digest": params_digest(p),
        "metrics": metrics,
        "metrics_missing": missing,
        "files": {
            f.name: {"sha256": io.sha256_file(f), "size": f.stat().st_size}
            for f in sorted(out.iterdir())
            if f.is_file()
        },
    }
    io.write_json(out / MANIFEST, manifest)
    return manifest


def main(params_file: str = "params.yaml") -> Path:
    p = config.load(params_file, *DIGEST_SECTIONS)
    out, logger = Path(p.paths.package_dir), log.get("package")
    modeling.require_model_dir(p.paths.merged_dir, modeling.FIX_MERGE)  # inputs first: one line, nothing written
    modeling.read_provenance(p.paths.base_dir)
    logger.info("package", merged=p.paths.merged_dir, out=str(out))
    with io.atomic_dir(out) as staging:
        manifest = build(p, staging, logger)
    size = sum(f["size"] for f in manifest["files"].values())
    logger.info("done", out=str(out), files=len(manifest["files"]), bytes=size, params_digest=manifest["params_digest"])
    return out


if __name__ == "__main__":
    stage.run("package", main, __doc__)
