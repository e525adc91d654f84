"""torch.compile on a QLoRA training step: eager vs each decoder layer compiled vs the whole causal LM compiled.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_compile.py [--params params.yaml] [--variants eager layers full]
                                                             [--rounds 3] [--json bench/results/compile.json]

Needs `models/base` (`dvc repro base`). Each variant runs in its own process (no shared compile state but the
inductor's on-disk cache): `stages.train.build_model` (nf4 + LoRA as `train.*`, the compute dtype `auto` picks),
AdamW, random-token batches of five shapes like the length-grouped micro-batches (each compiled once with
`dynamic=True`, their time reported as warm-up), then `--rounds` timed rounds over all five. Every position goes
through the vocabulary head (as in bench_train's bare arm). Real tokens/s = tokens / summed step time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = [(4, 256), (2, 500), (8, 128), (1, 760), (3, 330)]  # rows x length, as the default's micro-batches
VARIANTS = ("eager", "layers", "full")


def run_variant(params_file: str, variant: str, rounds: int) -> dict:
    import torch

    from bench.bench_train import bare_setup, bare_step
    from llmops import config, hardware
    from stages import train

    p = config.load(params_file, "train", "preprocess")
    dtype, _ = train.resolve_compute(p.train, 1)
    model, opt = bare_setup(p, dtype)
    if variant == "layers":  # regional compilation: one graph per decoder layer, reused by all 30
        for layer in model.base_model.model.model.layers:
            layer.compile(dynamic=True)
    elif variant == "full":  # the causal LM with its head and loss: what TrainingArguments(torch_compile=True) does
        model.base_model.model.compile(dynamic=True)

    def step(rows: int, length: int) -> float:
        return bare_step(model, opt, torch.randint(100, 40000, (rows, length)))

    warm = {f"{b}x{n}": round(step(b, n), 2) for b, n in SHAPES}  # first call per shape: compiles
    timed = sum(step(b, n) for _ in range(rounds) for b, n in SHAPES)
    tokens = rounds * sum(b * n for b, n in SHAPES)
    return {"variant": variant, "dtype": dtype, "machine": hardware.machine(), "warmup_s": warm,
            "warmup_total_s": round(sum(warm.values()), 1), "tokens": tokens, "step_s": round(timed, 2),
            "tokens_per_s": round(tokens / timed, 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=str(ROOT / "bench/results/compile.json"))
    ap.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)  # child process: run this variant, print JSON
    a = ap.parse_args()
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")
    a.params = str(Path(a.params).resolve())  # the children run in the repo root
    if a.one:
        print("RESULT " + json.dumps(run_variant(a.params, a.one, a.rounds)), flush=True)
        return
    import torch

    from llmops import config, io, modeling
    from llmops.stage import StageError

    try:  # before any child starts: a bad params file or a missing/corrupt base is one line, not a traceback
        modeling.require_model_dir(ROOT / config.load(a.params, "train").paths.base_dir)
    except StageError as e:
        sys.exit(str(e))
    res: dict = {"shapes": SHAPES, "rounds": a.rounds, "torch": torch.__version__}
    for v in a.variants:
        out = subprocess.run([sys.executable, __file__, "--params", a.params, "--rounds", str(a.rounds), "--one", v],
                             capture_output=True, text=True, cwd=ROOT)  # fmt: skip
        lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not lines:
            sys.exit(f"variant {v} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        res[v] = json.loads(lines[-1][len("RESULT ") :])
        print(json.dumps(res[v]), flush=True)
    for v in a.variants:
        if v != "eager" and "eager" in res:
            res[f"{v}_vs_eager"] = round(res[v]["tokens_per_s"] / res["eager"]["tokens_per_s"], 3)
    io.write_json(a.json, res)  # temp file + rename: an interrupted run leaves the previous results
    print(json.dumps({k: v for k, v in res.items() if k.endswith("_vs_eager")}))


if __name__ == "__main__":
    main()
