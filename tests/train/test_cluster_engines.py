"""ftpipe on the cluster engines people run, simulated on this machine: real processes on 127.0.0.1, real
gloo collectives, real checkpoints, each engine's own variables and the launch files of ``examples/``.

- **SLURM**: ``examples/slurm/train.sbatch`` run as sbatch runs a batch script (its environment), its
  ``srun`` and ``scontrol`` the stand-ins in ``tests/launchers/bin`` (the variables srun gives each task;
  each simulated node in a mount namespace of its own with a fresh tmpfs as its local disk). 2 nodes x 1
  task with node-local ``data_dir`` and ``prepare_per_node`` (the failure of the issue: the second node's
  task waited for a leader that never came), the preemption warning of ``#SBATCH --signal`` (SIGUSR1) in the
  middle of training, the script's requeue and the requeued job's exact resume; 1 node x 2 tasks on a
  shared ``data_dir`` without ``prepare_per_node``.
- **torchrun** across 2 nodes (two torchrun agents rendezvousing on localhost) with one restart of the
  failed workers (elastic), resuming from the checkpoint they left.
- **Kubernetes**: ``examples/kubernetes/pytorchjob.yaml``'s container command in the environment the
  training operator gives the master and the worker pod, as two local processes.

Every simulation ends with the LoRA weights of the single-process reference run (same data, same global
batch) within the tolerance of the numerics tests. A dead peer is reported by the survivor with the
rank, node and log of the process that went away.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from processes import REPO_ROOT, free_port, ftpipe_cmd, read_log, read_metrics, run_processes, subprocess_env
from tiny_runs import TINY, assert_same_steps, assert_same_weights

from ftpipe.config.paths import model_slug

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LAUNCHERS = Path(__file__).resolve().parents[1] / "launchers" / "bin"
SBATCH = REPO_ROOT / "examples" / "slurm" / "train.sbatch"
PYTORCHJOB = REPO_ROOT / "examples" / "kubernetes" / "pytorchjob.yaml"
CONFIG = REPO_ROOT / "configs" / "benchmark.yaml"


def _settings(tmp_path: Path, tiny_llama: Path, alpaca_demo: Path, **overrides) -> dict[str, object]:
    """The tiny numerics run's settings (every step sees the whole split: equal to the reference)."""
    return {
        **TINY,
        "hf_model_id": str(tiny_llama),
        "dataset": str(alpaca_demo),
        "data_dir": str(tmp_path / "data"),
        "results_dir": str(tmp_path / "results"),
        "strategy": "fsdp2",
        "micro_batch_size": 2,
        "num_workers": 0,
        "peak_tflops_per_device": 1.0,
        "shard_report_dir": str(tmp_path / "shards"),
        **overrides,
    }


def _cluster_environments(tmp_path: Path) -> set[str]:
    """The Lightning cluster environments the ranks ran with (their shard reports)."""
    return {json.loads(p.read_text())["cluster_environment"] for p in (tmp_path / "shards").glob("*.json")}


def _args(settings: dict[str, object]) -> list[str]:
    """``--field value`` arguments (what a user appends to the launch file's command)."""
    return ftpipe_cmd(settings)[6:]  # drop "python -m ftpipe train --config <file>"


class Run:
    """The outputs of a simulated job (the shape the numerics comparisons read)."""

    def __init__(self, tmp_path: Path, tiny_llama: Path):
        self.root = tmp_path / "results" / model_slug(str(tiny_llama))

    @property
    def metrics(self) -> tuple[list[dict], list[dict]]:
        return read_metrics(self.root / "metrics.jsonl")

    def checkpoint(self, name: str = "last.ckpt") -> Path:
        found = sorted(
            (self.root / "checkpoints").glob(f"version_*/*-{name}"), key=lambda p: p.stat().st_mtime
        )
        assert found, f"no <run id>-{name} under {self.root / 'checkpoints'}"
        return found[-1]

    def rank_logs(self) -> dict[int, str]:
        """Each rank's own log file (every record), kept in the run's logs/ folder."""
        logs = {}
        for path in (self.root / "logs").glob("ftpipe-train-*.log"):
            stem = path.stem
            rank = int(stem.rsplit("-rank", 1)[1]) if "-rank" in stem else 0
            logs[rank] = logs.get(rank, "") + path.read_text(errors="replace")
        return logs


# --------------------------------------------------------------------------------------------- SLURM


def _sbatch_env(
    job: Path, nodes: int, per_node: int, restart: int, node_local: Path | None
) -> dict[str, str]:
    """What sbatch gives the batch script of a job of ``nodes`` x ``per_node`` tasks (``--nodes``,
    ``--ntasks-per-node``; the batch step is task 0 on the first node), plus the simulation's own: the
    stand-in srun / scontrol first on PATH, their folder, and MASTER_ADDR: the simulated node names do not
    resolve, where a cluster's DNS would give the first node's address."""
    nodelist = f"sim-node[1-{nodes}]" if nodes > 1 else "sim-node1"
    env = {
        "SLURM_JOB_ID": "73310",
        "SLURM_JOBID": "73310",
        "SLURM_JOB_NAME": "ftpipe",
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_NODELIST": nodelist,
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_NNODES": str(nodes),
        "SLURM_NTASKS": str(nodes * per_node),
        "SLURM_NPROCS": str(nodes * per_node),
        "SLURM_NTASKS_PER_NODE": str(per_node),
        "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})",
        "SLURM_JOB_CPUS_PER_NODE": f"{per_node}(x{nodes})",
        "SLURM_SUBMIT_DIR": str(REPO_ROOT),
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURMD_NODENAME": "sim-node1",
        "PATH": os.pathsep.join([str(LAUNCHERS), str(Path(sys.executable).parent), os.environ["PATH"]]),
        "FAKE_SLURM_DIR": str(job),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    if restart:
        env["SLURM_RESTART_COUNT"] = str(restart)
    if node_local is not None:
        env["FAKE_SLURM_NODE_LOCAL"] = str(node_local)
    return env


def _sbatch(job: Path, settings: dict, nodes: int, per_node: int, restart: int = 0, node_local=None):
    """Start the example batch script (not waited for); its output goes to ``job/slurm-<restart>.out``."""
    job.mkdir(parents=True, exist_ok=True)
    env = subprocess_env(_sbatch_env(job, nodes, per_node, restart, node_local))
    out = open(job / f"slurm-{restart}.out", "w")  # noqa: SIM115 - closed by the caller through _finish
    proc = subprocess.Popen(
        ["bash", str(SBATCH), str(CONFIG), *_args(settings)],
        cwd=REPO_ROOT,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    proc.out = out  # type: ignore[attr-defined]
    return proc


def _finish(proc, timeout: float) -> tuple[int, str]:
    """Exit status and output of a started job; every process of it is gone afterwards."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.out.close()
    text = Path(proc.out.name).read_text(errors="replace")
    assert code is not None, f"the job did not end within {timeout:.0f} s:\n{text[-5000:]}"
    return code, text


def _wait_for(predicate, proc, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the job ended before {what}:\n{Path(proc.out.name).read_text()[-5000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.05)


def _task_pids(job: Path, restart: int) -> dict[int, int]:
    pids: dict[int, int] = {}
    for path in job.glob(f"tasks-{restart}-*.json"):
        pids.update({int(k): v for k, v in json.loads(path.read_text()).items()})
    return pids


@pytest.mark.timeout(900)
def test_slurm_two_nodes_with_local_disks_take_the_warning_signal_requeue_and_resume(
    tmp_path, tiny_llama, alpaca_demo, reference
):
    node_local = tmp_path / "node-local"  # each simulated node mounts a tmpfs of its own here
    settings = _settings(
        tmp_path, tiny_llama, alpaca_demo, data_dir=str(node_local / "data"), prepare_per_node=True
    )
    job = tmp_path / "job"
    first = _sbatch(job, settings, nodes=2, per_node=1, node_local=node_local)
    shards = tmp_path / "shards"
    # both ranks are training (their shard reports are written at the start of training): SLURM's warning
    _wait_for(lambda: len(list(shards.glob("shards_rank*.json"))) == 2, first, 300, "training on both nodes")
    pids = _task_pids(job, 0)
    assert sorted(pids) == [0, 1], pids
    for pid in pids.values():
        os.kill(pid, signal.SIGUSR1)  # `#SBATCH --signal=USR1@120`: slurmd signals every task
    code, out = _finish(first, 300)
    assert code == 3, f"exit {code}:\n{out[-5000:]}"
    assert "stopped, resumable" in out and "SIGUSR1 received: stopping after step" in out
    assert (job / "requeued").read_text().split() == ["73310"]  # the script requeued the job
    run = Run(tmp_path, tiny_llama)
    stopped_at = run.metrics[0][-1]["step"]
    assert stopped_at < TINY["max_steps"]
    logs = run.rank_logs()
    # each node prepared its own local disk (the second node's task led its node), nothing went outside
    for rank in (0, 1):
        assert (
            f"launched by slurm on slurm: rank {rank} of 2, local rank 0 of 1 on node {rank} of 2"
            in logs[rank]
        )
        assert "Preparing" in logs[rank], (
            f"rank {rank} did not prepare its node's data:\n{logs[rank][-3000:]}"
        )
    assert not any(node_local.rglob("*")), "data written outside the simulated node-local disks"

    second = _sbatch(job, settings, nodes=2, per_node=1, restart=1, node_local=node_local)
    code, out = _finish(second, 400)
    assert code == 0, f"exit {code}:\n{out[-5000:]}"
    assert "resuming from" in out
    assert [s["step"] for s in run.metrics[0]] == [1, 2, 3]
    assert_same_steps(run, reference, stopped=True)
    assert_same_weights(run, reference)


@pytest.mark.timeout(600)
def test_slurm_one_node_two_tasks_share_the_data_folder(tmp_path, tiny_llama, alpaca_demo, reference):
    settings = _settings(tmp_path, tiny_llama, alpaca_demo)
    job = _sbatch(tmp_path / "job", settings, nodes=1, per_node=2)
    code, out = _finish(job, 400)
    assert code == 0, f"exit {code}:\n{out[-5000:]}"
    run = Run(tmp_path, tiny_llama)
    logs = run.rank_logs()
    assert "launched by slurm on slurm: rank 1 of 2, local rank 1 of 2 on node 0 of 1" in logs[1]
    assert "Preparing" in logs[0] and "Preparing" not in logs[1]  # one preparation on the shared folder
    assert _cluster_environments(tmp_path) == {"SLURMEnvironment"}
    assert_same_steps(run, reference)
    assert_same_weights(run, reference)


# ------------------------------------------------------------------------------------------ torchrun


@pytest.mark.timeout(600)
def test_torchrun_two_nodes_restart_failed_workers_and_finish_like_one_process(
    tmp_path, tiny_llama, alpaca_demo, reference
):
    """Two torchrun agents (one per simulated node) with ``--max-restarts 1``: the workers die while the
    checkpoint of step 3 is being saved (SIGKILL), the agents start them again, and the restarted workers
    resume from the complete checkpoint of step 2 and finish."""
    settings = _settings(
        tmp_path,
        tiny_llama,
        alpaca_demo,
        num_nodes=2,
        gpus_per_node=1,
        kill_at_checkpoint_step=3,
        resume_from_checkpoint="auto",
    )
    port = free_port()
    commands = []
    for node in range(2):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
        torchrun += [
            "--node-rank",
            str(node),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{port}",
        ]
        torchrun += ["--rdzv-id", "sim", "--max-restarts", "1", "-m"]
        commands.append(torchrun + ftpipe_cmd(settings)[2:])
    # a fresh rendezvous store per restart (torchrun's shared agent store keeps the dead round's addresses)
    log = tmp_path / "torchrun"
    codes = run_processes(commands, log, timeout=500, env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    text = read_log(log)
    assert codes == [0, 0], f"exit codes {codes}:\n{text[-6000:]}"
    assert "fault injection: killing this process after writing the checkpoint of step 3" in text
    assert "resuming from" in text and "restart 1" in text  # the launch model saw the restart round
    run = Run(tmp_path, tiny_llama)
    assert_same_weights(run, reference)
    assert _cluster_environments(tmp_path) == {"TorchElasticEnvironment"}


# ---------------------------------------------------------------------------------------- Kubernetes


def _pod_env(manifest: dict, replica: str, index: int, port: int) -> tuple[list[str], dict[str, str]]:
    """A pod's command and the environment the training operator gives it: MASTER_ADDR (the master pod's
    service, here 127.0.0.1), MASTER_PORT, WORLD_SIZE, RANK (master 0, workers 1..), PET_* for torchrun,
    and Kubernetes' own service variables; ``$(VAR)`` in the command expanded as Kubernetes does."""
    specs = manifest["spec"]["pytorchReplicaSpecs"]
    replicas = sum(int(spec.get("replicas", 1)) for spec in specs.values())
    nproc = str(manifest["spec"].get("nprocPerNode", "1"))
    container = specs[replica]["template"]["spec"]["containers"][0]
    rank = index if replica == "Master" else index + 1
    env = {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}
    env.update(
        KUBERNETES_SERVICE_HOST="10.96.0.1",
        KUBERNETES_SERVICE_PORT="443",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(replicas * int(nproc)),
        RANK=str(rank),
        PYTHONUNBUFFERED="1",
        PET_MASTER_ADDR="127.0.0.1",
        PET_MASTER_PORT=str(port),
        PET_NNODES=str(replicas),
        PET_NODE_RANK=str(rank),
        PET_NPROC_PER_NODE=nproc,
    )
    command = [*container.get("command", []), *container.get("args", [])]
    expanded = [_expand(part, env) for part in command]
    return expanded, env


def _expand(text: str, env: dict[str, str]) -> str:
    import re

    return re.sub(r"\$\(([A-Z0-9_]+)\)", lambda m: env.get(m.group(1), m.group(0)), text)


@pytest.mark.timeout(600)
def test_kubernetes_pytorchjob_master_and_worker_train_like_one_process(
    tmp_path, tiny_llama, alpaca_demo, reference
):
    manifest = yaml.safe_load(PYTORCHJOB.read_text())
    manifest["spec"]["nprocPerNode"] = "1"  # one CPU process per simulated pod
    settings = _settings(tmp_path, tiny_llama, alpaca_demo)
    port = free_port()
    commands, envs = [], []
    for replica in ("Master", "Worker"):
        command, env = _pod_env(manifest, replica, 0, port)
        assert command[:1] == ["torchrun"] and "--config" in command
        # the image's torchrun and configuration: this checkout's
        command[0:1] = [sys.executable, "-m", "torch.distributed.run"]
        command[command.index("--config") + 1] = str(CONFIG)
        commands.append(command + _args(settings))
        envs.append(env)
    assert envs[0]["RANK"] == "0" and envs[1]["RANK"] == "1"
    log = tmp_path / "pods"
    codes = _run_pods(commands, envs, log)
    text = read_log(log)
    assert codes == [0, 0], f"exit codes {codes}:\n{text[-6000:]}"
    run = Run(tmp_path, tiny_llama)
    logs = run.rank_logs()
    assert "launched by torchrun on kubernetes: rank 1 of 2, local rank 0 of 1 on node 1 of 2" in logs[1]
    assert _cluster_environments(tmp_path) == {"TorchElasticEnvironment"}
    assert_same_steps(run, reference)
    assert_same_weights(run, reference)


def _run_pods(commands: list[list[str]], envs: list[dict[str, str]], log: Path) -> list[int]:
    """Each pod's command with its own environment (the operator's), at once; their exit statuses."""
    procs, outs = [], []
    try:
        for i, (command, env) in enumerate(zip(commands, envs, strict=True)):
            outs.append(open(log.with_suffix(f".{i}.log"), "w"))  # noqa: SIM115 - closed below
            procs.append(
                subprocess.Popen(
                    command,
                    cwd=REPO_ROOT,
                    env=subprocess_env(env),
                    stdout=outs[-1],
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        return [p.wait(timeout=450) for p in procs]
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        for out in outs:
            out.close()
