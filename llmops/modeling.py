"""Loading base models for training, merging and evaluation: one place for the 4-bit recipe.

The same `quantization_config()` is used by train (QLoRA) and by merge/evaluate when they rebuild
"what was trained" (nf4 base + adapter), so the parity checks compare against the real thing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmops import hardware, log
from llmops.stage import StageError

FIX_BASE = "run `dvc repro base` (or `dvc pull base`)"
FIX_TRAIN = "run `dvc repro train`"
FIX_MERGE = "run `dvc repro merge`"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "train_provenance.json")


class ModelLoadError(StageError):
    """A model folder that is missing or damaged; the message names the path and the fix."""


def check_safetensors(path: Path, fix: str) -> None:
    """Header + size check of one .safetensors file: a truncated download or copy fails here, in one line,
    instead of as a SafetensorError deep inside from_pretrained."""
    import json
    import struct

    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{path}: corrupt safetensors file ({e}); {fix}") from None
    if 8 + n + end != size:
        raise ModelLoadError(
            f"{path}: truncated or corrupt safetensors file ({size} bytes, header says {8 + n + end}); {fix}"
        )


def require_model_dir(model_dir: str | Path, fix: str = FIX_BASE, weights: bool = True) -> Path:
    """The folder exists, has a config (or tokenizer files) and intact safetensors, else one clear error.
    Also keeps a missing local path from being taken for a Hub repo id by transformers."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: model folder missing; {fix}")
    if weights:
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise ModelLoadError(f"{path}: no *.safetensors weights (only safetensors are loaded); {fix}")
        refetch = f"re-fetch it: {fix.removeprefix('run ')}" if "dvc repro base" in fix else f"replace it: {fix}"
        for shard in shards:
            check_safetensors(shard, refetch)
    return path


def resolve_dtype(name: str) -> str:
    """`auto` → bfloat16 on a bf16-capable GPU or CPU, float16 on an older GPU, else float32."""
    if name != "auto":
        return name
    import torch

    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if hardware.cpu_has_native_bf16() else "float32"


def torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[resolve_dtype(name)]


def quantization_config(compute_dtype: str):
    """nf4 + double quantization (QLoRA paper defaults); compute in bf16 where the device has it."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            f"train.method=qlora needs bitsandbytes ({e}); `pip install bitsandbytes==0.50.2` or set train.method: lora"
        ) from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch_dtype(compute_dtype),
    )


def resolve_device_map(spec: Any) -> Any:
    """`auto` → all on cuda:0 when there is a GPU, else cpu; a string or a {module: device} dict passes through.

    A dict is how the seed's mixed box (RTX 5090 + 5060 Ti) splits layers, e.g.
    {"model.embed_tokens": 0, "model.layers.0": 0, ..., "model.layers.31": 1, "model.norm": 1, "lm_head": 1}.
    """
    import torch

    if spec == "auto":
        return {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    if isinstance(spec, str):
        if spec.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"train.device_map={spec!r} but torch sees no CUDA device; use auto or cpu")
        return {"": spec}
    if isinstance(spec, dict):
        if (
            any(str(v).startswith("cuda") or isinstance(v, int) for v in spec.values())
            and not torch.cuda.is_available()
        ):
            raise RuntimeError("train.device_map places modules on CUDA but torch sees no CUDA device")
        return spec
    raise ValueError(f"train.device_map={spec!r}: expected auto, a device string or a mapping")


def require_adapter_dir(adapter_dir: str | Path) -> Path:
    """The train stage's adapter folder, complete and intact, else one line naming what is missing."""
    path = Path(adapter_dir)
    missing = [f for f in ADAPTER_FILES if not (path / f).exists()]
    if missing:
        raise ModelLoadError(f"{path}: missing {', '.join(missing)}; {FIX_TRAIN}")
    check_safetensors(path / "adapter_model.safetensors", f"replace it: {FIX_TRAIN}")
    return path


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False, fix: str = FIX_BASE):
    from transformers import AutoTokenizer

    require_model_dir(model_dir, fix, weights=False)
    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


def load_model(
    model_dir: str | Path,
    *,
    quantize_4bit: bool,
    dtype: str = "auto",
    device_map: Any = "auto",
    trust_remote_code: bool = False,
    fix: str = FIX_BASE,
):
    """A causal LM from safetensors only (never pickles), 4-bit nf4 or 16-bit."""
    from transformers import AutoModelForCausalLM

    require_model_dir(model_dir, fix)
    kw: dict[str, Any] = {"dtype": torch_dtype(dtype), "device_map": resolve_device_map(device_map)}
    if quantize_4bit:
        kw["quantization_config"] = quantization_config(dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, use_safetensors=True, trust_remote_code=trust_remote_code, **kw
    )
    if quantize_4bit:
        keep_nf4_trainable(model)
    return model


def keep_nf4_trainable(model) -> None:
    """Pin bitsandbytes' nf4 layers to dequantize + matmul in the compute dtype.

    bitsandbytes 0.50 on AVX512-BF16 CPUs repacks nf4 weights for a fused bf16 kernel at the first eval-mode,
    no-grad forward (the train stage's base eval) and never unpacks them: every later training forward then runs
    that kernel, which has no backward (no gradient reaches the layer's input, silently) and computes in bf16
    whatever the compute dtype. The dequantize + matmul path has both; it is also what AVX2 CPUs and GPUs run.
    """
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def compile_layers(model):
    """train.compile: layers. Every decoder layer through torch.compile in place (regional compilation; state-dict
    keys unchanged, so checkpoints and the adapter save as in eager); returns the model. The layers share one graph
    (compiled once, ~40 s on 2 CPU cores) that fuses the norms, activations, rotary and LoRA elementwise work between
    the matmuls; the head, the loss and the optimizer stay eager. dynamic=True: the micro-batches' shapes vary."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(base.get_decoder(), "layers", None)
    if layers is None:
        raise StageError(f"train.compile: layers needs a decoder with a `layers` list ({type(base).__name__} has "
                         "none); use train.compile: none")  # fmt: skip
    if next(model.parameters()).device.type == "cpu" and not cpu_compiler():  # GPU kernels come from triton
        log.get("train").warning("compile_skipped", reason="torch.compile on CPU needs a C++ compiler and none was "
                                 "found", fix="install g++ (or set CXX), or set train.compile: none")  # fmt: skip
        return model
    for layer in layers:
        layer.compile(dynamic=True)
    return model


def cpu_compiler() -> str | None:
    """The C++ compiler inductor would build CPU kernels with, or None (a laptop without one trains eager, with a
    warning, instead of failing at the first step)."""
    try:
        from torch._inductor import cpp_builder  # torch's own search: $CXX, else g++ (clang++ on macOS)

        return cpp_builder.get_cpp_compiler()
    except Exception:  # noqa: BLE001 - any failure of the search means: no usable compiler
        return None


def stop_ids(eos_token_id, eot_id: int | None = None) -> list[int]:
    """A generation config's eos (an id, a list or None) as a sorted list, with the end-of-turn id added: vLLM and
    transformers stop on exactly these, so a reply ends with its turn."""
    eos = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
    return sorted({e for e in eos if e is not None} | ({eot_id} if eot_id is not None else set()))


def set_stop_ids(model, eot_id: int, pad_fallback: int | None = None) -> list[int]:
    """Make `model.generation_config` stop at the end of a turn (and pad with something): what base and merge save."""
    gen = model.generation_config
    gen.eos_token_id = stop_ids(gen.eos_token_id, eot_id)
    if gen.pad_token_id is None:
        gen.pad_token_id = pad_fallback if pad_fallback is not None else eot_id
    return gen.eos_token_id


def read_provenance(folder: str | Path, name: str = "provenance.json", fix: str = FIX_BASE) -> dict:
    """A model folder's provenance JSON (the base's, or the adapter's `train_provenance.json`), else one clear error."""
    import json

    path = Path(folder) / name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: missing; {fix}") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e.msg}); {fix}") from None


def assistant_positions(model, encoded: list, desc: str = ""):
    """Yield, per encoded row (llmops.chat.Encoded), the fp32 logits at the positions that predict an assistant
    token (where the loss is taken) and those tokens: the one forward pass behind merge's parity figures and
    evaluate's perplexity. One row per forward (no padding to compute) projected to the vocabulary only where a
    label is (`logits_to_keep`): measured 65 s -> 38 s on evaluate's test split (BENCHMARKS.md "Pipeline")."""
    import torch
    from tqdm import tqdm

    from llmops.chat import IGNORE_INDEX

    device = next(model.parameters()).device
    with torch.inference_mode():
        for e in tqdm(encoded, desc=desc or "forward", leave=False, disable=None):
            labels = torch.tensor(e.labels[1:], device=device)
            keep = (labels != IGNORE_INDEX).nonzero().squeeze(1)
            logits = model(input_ids=torch.tensor([e.input_ids], device=device), logits_to_keep=keep).logits[0]
            yield logits.float().cpu(), labels[keep].cpu()


def check_target_modules(base_dir: Path, names: tuple[str, ...]) -> None:
    """Every train.target_modules entry must name modules of the base model as peft matches them (the full name or
    its last dotted parts): peft itself adapts whatever matches and stays silent about the rest."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():  # the module tree from config.json, no weights
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir))
    modules = [n for n, _ in model.named_modules() if n]
    bad = [t for t in names if not any(n == t or n.endswith(f".{t}") for n in modules)]
    if bad:
        have = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
        raise StageError(
            f"train.target_modules: {bad} match no module of {base_dir} (its linear layers: {', '.join(have)}); "
            "fix the list in params.yaml (a missing comma joins two names into one)"
        )
