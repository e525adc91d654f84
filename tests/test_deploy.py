"""deploy/: the SkyPilot training task (parsed by SkyPilot itself; runs only commands that exist; its script keeps
checkpoints on the bucket so a replacement spot instance resumes), the multi-node launch line, and one dvc queue
worker per GPU. No cloud and no GPU: what a CPU box can check."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from deploy import queue_gpus
from tests.conftest import ROOT, repo_params
from tests.test_serve import clean_env, dvc, git

SKY_TASK = ROOT / "deploy/sky/train.yaml"
README = (ROOT / "README.md").read_text()
REQUIRED = {"REPO_URL": "https://github.com/example/llmops.git", "EXP_NAME": "lr-2e-4", "CKPT_BUCKET": "llmops-ckpt"}
PARAMS = "train.lr=2e-4 train.lora_r=8"

PARSE = """
import json, sys, yaml, sky
path, overrides = sys.argv[1], json.loads(sys.argv[2])
try:
    sky.Task.from_yaml(path)
    required = None
except ValueError as e:
    required = str(e)
t = sky.Task.from_yaml_config(yaml.safe_load(open(path)), env_overrides=list(overrides.items()))
print(json.dumps({
    "required": required, "name": t.name, "workdir": t.workdir, "envs": t.envs,
    "secrets": {k: v.get_secret_value() for k, v in t.secrets.items()},
    "resources": [{"accelerators": r.accelerators, "spot": r.use_spot, "disk": r.disk_size,
                   "recovery": r.job_recovery} for r in t.resources],
    "mounts": {p: {"name": s.name, "mode": s.mode.value, "persistent": s.persistent, "source": s.source}
               for p, s in t.storage_mounts.items()},
    "file_mounts": t.file_mounts, "setup": t.setup, "run": t.run,
}))
"""


@pytest.fixture(scope="module")
def sky_task(tmp_path_factory) -> dict:
    """The task as SkyPilot parses and validates it (its own schema); `import sky` writes ~/.sky, so HOME is a
    temp folder, and no cloud credentials are involved."""
    home = tmp_path_factory.mktemp("home")
    proc = subprocess.run(
        [sys.executable, "-c", PARSE, str(SKY_TASK), json.dumps({**REQUIRED, "PARAMS": PARAMS})],
        env=clean_env(HOME=str(home)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_skypilot_parses_the_training_task(sky_task):
    t = sky_task
    assert "Environment variable 'REPO_URL' is None" in t["required"]  # required envs: SkyPilot refuses without
    assert t["name"] == "llmops-train" and t["workdir"] == {"url": REQUIRED["REPO_URL"], "ref": "main"}
    assert {r["accelerators"] and len(r["accelerators"]) for r in t["resources"]} == {1}  # one GPU, any of them
    assert {list(r["accelerators"].values())[0] for r in t["resources"]} == {1}
    assert all(r["spot"] and r["recovery"]["strategy"] and r["disk"] >= 100 for r in t["resources"])
    assert t["mounts"] == {  # the checkpoint bucket: kept after the job, writable with renames
        "/checkpoints": {"name": "llmops-ckpt", "mode": "MOUNT_CACHED", "persistent": True, "source": None}
    }
    assert t["secrets"] == {"GIT_TOKEN": "", "HUGGINGFACE_TOKEN": "", "MLFLOW_TRACKING_URI": ""}  # no value committed
    assert not set(t["envs"]) & {"GIT_TOKEN", "HUGGINGFACE_TOKEN", "MLFLOW_TRACKING_URI", "API_KEY"}


def _commands(script: str, subst: dict[str, list[str]]) -> list[list[str]]:
    """The simple commands of a bash script: split at ; && || | { } and newlines, comments dropped, `$VAR`s that
    are in `subst` replaced (a word can become several)."""
    cmds: list[list[str]] = []
    for line in script.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|{}")
        lex.whitespace_split, lex.commenters = True, "#"
        cmd: list[str] = []
        for word in list(lex) + [";"]:
            if set(word) <= set(";&|{}"):
                cmds += [cmd] if cmd else []
                cmd = []
            else:
                cmd += subst.get(word, [word])
    return cmds


def _makefile() -> tuple[set[str], set[str]]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([\w-]+):", text, re.M)), set(re.findall(r"^([A-Z_]+) \??=", text, re.M))


def _dotted(key: str) -> bool:
    node = repo_params()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_training_task_runs_only_commands_that_exist(sky_task):
    from dvc.cli import parse_args

    envs = sky_task["envs"]
    subst = {f"${k}": [v] for k, v in envs.items()} | {f"${{{k}}}": [v] for k, v in envs.items()}
    subst["${overrides[@]}"] = [w for kv in envs["PARAMS"].split() for w in ("-S", kv)]
    targets, variables = _makefile()
    seen = set()
    for cmd in _commands(sky_task["setup"], subst) + _commands(sky_task["run"], subst):
        tool = Path(cmd[0]).name
        if tool == "make":
            seen.add("make")
            assert cmd[1] in targets, f"Makefile has no target {cmd[1]!r}"
            for assignment in cmd[2:]:
                var, _, value = assignment.partition("=")
                assert var in variables, f"Makefile has no variable {var}"
            assert (ROOT / f"requirements-{dict(a.split('=') for a in cmd[2:])['VLLM_FLAVOUR']}.txt").exists()
        elif tool == "dvc" and cmd[1:] != ["--version"]:
            seen.add(" ".join(cmd[:3]))
            args = parse_args(cmd[1:])  # DVC's own CLI parser: an unknown command or option raises
            assert f"dvc {cmd[1]} {cmd[2]}" in README, f"README does not document `dvc {cmd[1]} {cmd[2]}`"
            for key in getattr(args, "set_param", None) or []:
                assert _dotted(key.split("=")[0]), f"-S {key}: no such key in params.yaml"
        elif tool.startswith("python") and "-m" in cmd:
            module = cmd[cmd.index("-m") + 1]
            seen.add(f"python -m {module}")
            # Not find_spec("pip"): setuptools' distutils shim switches itself off for the rest of the process
            # when pip is looked up, and vLLM's later `import setuptools` then fails its own sanity check.
            assert md.distribution(module) if module == "pip" else importlib.util.find_spec(module), module
            assert f"-m {module}" in README + (ROOT / "Makefile").read_text() + (ROOT / "dvc.yaml").read_text()
    assert seen >= {"make", "dvc exp run", "dvc exp push", "python -m pip"}, seen
    assert "sky jobs launch deploy/sky/train.yaml" in README


def _stub(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


# A stand-in for dvc on the instance: `exp run` does what the train stage does with its checkpoint folder
# (resume from the newest complete checkpoint, write the next one), then fails when PREEMPT is set.
FAKE_DVC = """echo "dvc $*" >> "$LOG"
[ "$1" = --version ] && echo 3.67.1 && exit 0
if [ "$1 $2" = "exp run" ]; then
  run=models/checkpoints/0123456789abcdef
  mkdir -p "$run"
  n=$(ls "$run" | wc -l)
  echo "resume from $n checkpoint(s)" >> "$LOG"
  mkdir "$run/checkpoint-$((n + 1))"
  [ -z "$PREEMPT" ] || exit 1
fi
"""


def _instance(tmp_path: Path, name: str, sky_task: dict, bucket: Path, **env: str) -> tuple[int, list[str], Path]:
    """Run the task's setup + run on a fresh "instance" (an empty git clone) with the bucket mounted at
    CKPT_MOUNT; make, python3.11, the venv's python and dvc are stubs that log their arguments."""
    vm = tmp_path / name
    vm.mkdir()
    git(vm, "init", "-q")
    stubs, log = tmp_path / "stubs", tmp_path / f"{name}.log"
    _stub(stubs / "make", 'echo "make $*" >> "$LOG"; mkdir -p .venv/bin\n')
    _stub(stubs / "python3.11", "exit 0\n")
    _stub(vm / ".venv/bin/dvc", FAKE_DVC)
    _stub(vm / ".venv/bin/python", 'echo "python $*" >> "$LOG"\n')
    (vm / ".venv/bin/activate").write_text(f'export PATH="{vm / ".venv/bin"}:$PATH"\n')
    envs = {**sky_task["envs"], "CKPT_MOUNT": str(bucket), "LOG": str(log), **env}
    environ = clean_env(PATH=f"{stubs}:{os.environ['PATH']}", HOME=str(tmp_path / "home"), **envs)
    rc = 0
    for script in (sky_task["setup"], sky_task["run"]):
        rc = rc or subprocess.run(["bash", "-c", script], cwd=vm, env=environ, timeout=60).returncode
    return rc, log.read_text().splitlines(), vm


def test_a_replacement_instance_resumes_from_the_checkpoints_on_the_bucket(sky_task, tmp_path):
    bucket = tmp_path / "bucket"  # what SkyPilot mounts at CKPT_MOUNT on every instance of the job
    rc, log, vm1 = _instance(tmp_path, "vm1", sky_task, bucket, PREEMPT="1")
    assert rc == 1 and log == [
        "make install VLLM_FLAVOUR=gpu PY=python3.11",
        "dvc --version",
        "python -m pip install --quiet dvc[s3]==3.67.1",
        "dvc exp run --pull -n lr-2e-4 -S train.lr=2e-4 -S train.lora_r=8",
        "resume from 0 checkpoint(s)",
    ]  # preempted mid-run: nothing pushed
    assert (vm1 / "models/checkpoints").resolve() == bucket / "lr-2e-4"

    rc, log, vm2 = _instance(tmp_path, "vm2", sky_task, bucket)  # the managed job's next spot instance
    assert rc == 0 and log[-3:] == [
        "dvc exp run --pull -n lr-2e-4 -S train.lr=2e-4 -S train.lora_r=8",
        "resume from 1 checkpoint(s)",  # vm1's checkpoint, through the bucket
        "dvc exp push origin lr-2e-4",
    ]
    assert sorted(p.name for p in (bucket / "lr-2e-4/0123456789abcdef").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    assert "name = SkyPilot lr-2e-4" in (vm2 / ".git/config").read_text()  # so dvc exp run can commit

    rc, log, _ = _instance(tmp_path, "vm3", sky_task, bucket, EXP_NAME="default-params", PARAMS="")
    assert rc == 0 and log[-3:] == [
        "dvc exp run --pull -n default-params",  # no -S at all (an empty array under `set -u`)
        "resume from 0 checkpoint(s)",  # its own folder: the train stage wipes other runs' checkpoints in it
        "dvc exp push origin default-params",
    ]
    assert len(list((bucket / "lr-2e-4/0123456789abcdef").iterdir())) == 2  # the other experiment's are untouched


@pytest.mark.slow
def test_dvc_keeps_a_persisted_out_that_is_a_symlink_to_the_mount(tmp_path):
    """What the task does to models/checkpoints (a persist, cache: false out in dvc.yaml), with DVC itself."""
    repo, mount = tmp_path / "repo", tmp_path / "mount/exp"
    repo.mkdir()
    mount.mkdir(parents=True)
    git(repo, "init", "-q")
    dvc(repo, "init", "-q")
    (repo / "params.yaml").write_text("lr: 1\n")
    step = "import pathlib; c = pathlib.Path('ckpt'); n = len(list(c.iterdir())); (c / f'step-{n}').mkdir(); "
    step += "pathlib.Path('adapter.txt').write_text(str(n))"
    stage = {
        "cmd": f'python -c "{step}"',
        "params": ["lr"],
        "outs": ["adapter.txt", {"ckpt": {"persist": True, "cache": False}}],
    }
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}}))
    (repo / ".gitignore").write_text("/ckpt\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "init")
    (repo / "ckpt").symlink_to(mount)
    dvc(repo, "exp", "run", "-n", "first", "-S", "lr=2")
    dvc(repo, "exp", "run", "-n", "second", "-S", "lr=3")
    assert (repo / "ckpt").is_symlink() and sorted(p.name for p in mount.iterdir()) == ["step-0", "step-1"]
    assert (repo / "adapter.txt").read_text() == "1"  # the second run saw the first's checkpoint


# ---------------------------------------------------------------------------------------------- multi-node


def test_documented_multinode_launch_line_parses_with_accelerate():
    from accelerate.commands.launch import launch_command_parser

    section = README[README.index("## Multi-node training") :]
    block = section[section.index("```bash") : section.index("```", section.index("```bash") + 7)]
    line = re.search(r"^accelerate launch .*?-m stages\.train$", block.replace("\\\n", " "), re.M | re.S)
    assert line, "README: no `accelerate launch ... -m stages.train` line under Multi-node training"
    values = {
        "SKYPILOT_NUM_NODES": "2",
        "SKYPILOT_NODE_RANK": "1",
        "SKYPILOT_NUM_GPUS_PER_NODE": "8",
        "MASTER": "10.0.0.1",
    }
    text = re.sub(r"\$\(\(SKYPILOT_NUM_NODES \* SKYPILOT_NUM_GPUS_PER_NODE\)\)", "16", line[0])
    text = re.sub(r'"?\$\{?(\w+)\}?"?', lambda m: values[m[1]], text)
    args = launch_command_parser().parse_args(shlex.split(text)[2:])
    assert (args.num_machines, args.machine_rank, args.num_processes) == (2, 1, 16)
    assert args.main_process_ip == "10.0.0.1" and args.module and args.training_script == "stages.train"
    assert (ROOT / args.config_file).exists() and "FSDP" in (ROOT / args.config_file).read_text()


# ---------------------------------------------------------------------------------------------- dvc queue


def test_queue_gpus_refuses_duplicate_gpus():
    with pytest.raises(SystemExit, match=r"queue_gpus: error: --gpus '0,0': give distinct GPU ids"):
        queue_gpus.main(["--gpus", "0,0"])


# Each experiment records the CUDA_VISIBLE_DEVICES it ran with, then waits until the other one runs too: both
# workers must be up at once, each with its own GPU.
GPU_STAGE = """import os, pathlib, time
gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
seen = pathlib.Path(os.environ["SEEN_DIR"])
(seen / gpu).write_text(os.environ.get("DVC_EXP_NAME", ""))
deadline = time.time() + 150
while len(list(seen.iterdir())) < 2 and time.time() < deadline:
    time.sleep(0.5)
pathlib.Path("gpu.txt").write_text(gpu)
"""


@pytest.mark.slow
def test_one_queue_worker_per_gpu_each_sees_only_its_own(tmp_path):
    repo, seen = tmp_path / "repo", tmp_path / "seen"
    repo.mkdir()
    seen.mkdir()
    git(repo, "init", "-q")
    dvc(repo, "init", "-q")
    (repo / "gpu_stage.py").write_text(GPU_STAGE)
    (repo / "params.yaml").write_text("lr: 1\n")
    stage = {"cmd": "python gpu_stage.py", "deps": ["gpu_stage.py"], "params": ["lr"], "outs": ["gpu.txt"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"gpu": stage}}))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "init")
    for lr in (2, 3):
        dvc(repo, "exp", "run", "--queue", "-S", f"lr={lr}")

    env = clean_env(SEEN_DIR=str(seen), DVC_NO_ANALYTICS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "deploy.queue_gpus", "--gpus", "3,5,7"]
    try:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        started = [json.loads(line) for line in proc.stderr.splitlines() if '"worker_started"' in line]
        assert [(w["worker"], w["cuda_visible_devices"]) for w in started] == [(1, "3"), (2, "5")]  # 2 queued
        deadline = time.monotonic() + 240
        while (out := dvc(repo, "queue", "status")).count("Success") < 2:
            assert "Failed" not in out and time.monotonic() < deadline, out
            time.sleep(3)
    finally:
        subprocess.run([sys.executable, "-m", "dvc", "queue", "stop", "--kill"], cwd=repo, env=env, timeout=120)
    assert sorted(p.name for p in seen.iterdir()) == ["3", "5"]  # each experiment on its own "GPU", concurrently


def test_queue_gpus_needs_queued_experiments(tmp_path):
    git(tmp_path, "init", "-q")
    dvc(tmp_path, "init", "-q")
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.queue_gpus", "--gpus", "0,1"],
        cwd=tmp_path,
        env=clean_env(DVC_NO_ANALYTICS="1", PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (proc.returncode, proc.stderr.strip().splitlines()[-1]) == (
        1,
        "queue_gpus: error: no queued experiments: queue them first (`dvc exp run --queue -S train.lr=...`)",
    )
