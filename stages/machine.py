"""machine: what decides this machine's numerics, as a file evaluation depends on.

    python -m stages.machine [--params params.yaml]

`auto` dtypes resolve per machine: bf16 on GPUs and on CPUs with AVX512-BF16/AMX, fp32 on AVX2-only CPUs
(llmops.hardware). evaluate_base's rows are reused by a fine-tune's evaluate only when scored with this machine's
dtypes (llmops.scoring.settings); without this stage a checkout of a run scored on the other CPU kind keeps the
committed rows (DVC sees no changed input), and evaluate scores the base again on every experiment.
dvc.yaml marks the stage `always_changed`: it runs on every `dvc repro` (no torch import: well under a second),
and evaluate_base and evaluate rerun only when its output changes. train does not depend on it: an adapter trained
on one kind stays valid on the other (merge's gate compares in fp32 everywhere).
Output: `paths.machine` {"gpus": [model names], "cpu_native_bf16": bool}.
"""

from __future__ import annotations

from llmops import config, hardware, io, stage


def main(params_file: str = "params.yaml") -> dict:
    p = config.load(params_file)
    out = hardware.numerics()
    io.write_json(p.paths.machine, out)  # no log line: structlog's import alone would add a third to its cost
    return out


if __name__ == "__main__":
    stage.run("machine", main, __doc__)
