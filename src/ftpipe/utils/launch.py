"""Who this process is in its job: one launch model, read once from the environment.

Every launcher tells its processes who they are through environment variables of its own: torchrun
(``RANK``, ``LOCAL_RANK``, ``GROUP_RANK``, ``TORCHELASTIC_*``), SLURM's ``srun`` (``SLURM_PROCID``,
``SLURM_LOCALID``, ``SLURM_NODEID``, ...), the Kubernetes training operator (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``PET_*`` per pod), SageMaker (``SM_HOSTS``, ``SM_CURRENT_HOST``) and Lightning's own
launcher, which re-runs ftpipe's command line for the other local ranks (``LOCAL_RANK``, ``NODE_RANK``,
``WORLD_SIZE``). :func:`current` reads them into one :class:`Launch`; every other module asks it (rank,
local rank, node, the data leader of a node, log tags, the restart round, the cluster environment that
Lightning is given) and none reads a launcher variable itself (``tests/test_architecture.py`` checks it).

The rules follow Lightning's cluster environments where they fit (torchrun before SLURM, since torchrun
also runs inside ``srun``; SLURM only when ``SLURM_NTASKS`` is set and the job is not an interactive
``bash``; SLURM's default port from the job id), and a launch whose variables contradict each other is a
list of :attr:`Launch.problems`, each naming the variables, which :func:`check_launch` turns into one
error before any weights load.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

from ftpipe.errors import FtpipeError

#: ``single``: no launcher (one process, or the first process of ftpipe's own launch before it starts
#: the others); ``ftpipe``: a process started by ftpipe's launch (Lightning's launcher re-running the
#: command line), or a node of a multi-node launch by hand (``NODE_RANK`` / ``MASTER_ADDR``).
Launcher = Literal["single", "ftpipe", "torchrun", "slurm", "kubeflow", "sagemaker"]
Cluster = Literal["local", "slurm", "kubernetes", "sagemaker"]

#: The variables a launcher gives its worker processes; a process that ftpipe starts for another purpose
#: (the vLLM worker) must not see them, or it would take itself for a rank of a distributed job.
WORKER_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)
#: Every variable this module reads (prefixes end with ``_``), for messages and the architecture test.
LAUNCHER_VARIABLES = (
    *WORKER_VARIABLES,
    "GROUP_WORLD_SIZE",
    "TORCHELASTIC_",
    "SLURM_",
    "SLURMD_NODENAME",
    "PET_",
    "KUBERNETES_SERVICE_HOST",
    "SM_HOSTS",
    "SM_CURRENT_HOST",
    "OMPI_COMM_WORLD_",
    "PMI_RANK",
)
#: SLURM job names of an interactive allocation, in which processes are started by hand (Lightning's rule).
SLURM_INTERACTIVE = ("bash", "interactive")
#: SageMaker's rendezvous port for a launch without torchrun (Lightning's launcher on every host).
SAGEMAKER_PORT = 7777


class LaunchError(FtpipeError):
    """The launcher's variables contradict each other or the configuration; the message names them."""


@dataclass(frozen=True, kw_only=True)
class Launch:
    """Who this process is in its job.

    Attributes:
        launcher: who started this process (see :data:`Launcher`).
        cluster: where the job runs (``local`` unless SLURM, Kubernetes or SageMaker says so).
        rank: global rank (the process group's own once it exists).
        local_rank: rank on this node.
        node_rank: this node's index.
        world_size: processes in the job.
        processes_per_node: processes on each node.
        num_nodes: nodes in the job.
        master_addr: the rendezvous address (None where the launcher makes it itself).
        master_port: the rendezvous port.
        restart_count: the launcher's restart round (torchrun's restarts, SLURM's requeues).
        max_restarts: torchrun's ``--max-restarts``.
        shared_store: torchrun shares one rendezvous store across restarts.
        job_id: the scheduler's job id (SLURM, torchrun's run id).
        host: this node's name.
        hosts: the job's hosts where the launcher lists them (SageMaker).
        variables: the launcher variables read, for messages.
        problems: contradictions found, each naming its variables (empty when the launch is sound).
    """

    launcher: Launcher = "single"
    cluster: Cluster = "local"
    rank: int = 0
    local_rank: int = 0
    node_rank: int = 0
    world_size: int = 1
    processes_per_node: int = 1
    num_nodes: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    restart_count: int = 0
    max_restarts: int = 0
    shared_store: bool = False
    job_id: str | None = None
    host: str = field(default_factory=socket.gethostname)
    hosts: tuple[str, ...] = ()
    variables: dict[str, str] = field(default_factory=dict)
    problems: tuple[str, ...] = ()

    @property
    def external(self) -> bool:
        """Whether a launcher other than ftpipe started every process (torchrun, srun, the operator)."""
        return self.launcher in ("torchrun", "slurm", "kubeflow")

    @property
    def node_leader(self) -> bool:
        """Whether this process is the first of its node (it prepares node-local data)."""
        return self.local_rank == 0

    def describe(self) -> str:
        """One line for the log: launcher, rank, node and rendezvous."""
        where = f" on {self.cluster}" if self.cluster != "local" else ""
        rendezvous = f", rendezvous {self.master_addr}:{self.master_port}" if self.master_addr else ""
        restart = f", restart {self.restart_count}" if self.restart_count else ""
        job = f", job {self.job_id}" if self.job_id else ""
        return (
            f"launched by {self.launcher}{where}: rank {self.rank} of {self.world_size}, local rank "
            f"{self.local_rank} of {self.processes_per_node} on node {self.node_rank} of {self.num_nodes} "
            f"({self.host}){rendezvous}{restart}{job}"
        )

    def shape_problems(self, num_nodes: int, gpus_per_node: int) -> list[str]:
        """How the configuration's ``num_nodes`` x ``gpus_per_node`` differs from what the launcher started
        (nothing to compare for ftpipe's own launch, which starts what the configuration says)."""
        if not self.external and self.launcher != "sagemaker":
            return []
        found = []
        given = ", ".join(f"{k}={v}" for k, v in self.variables.items() if _is_shape_variable(k))
        if self.num_nodes != num_nodes:
            found.append(
                f"num_nodes is {num_nodes} but {self.launcher} started {self.num_nodes} node(s) ({given}): "
                f"set --num_nodes {self.num_nodes}"
            )
        if self.processes_per_node != gpus_per_node:
            found.append(
                f"gpus_per_node is {gpus_per_node} but {self.launcher} started {self.processes_per_node} "
                f"process(es) per node ({given}): set --gpus_per_node {self.processes_per_node}"
            )
        return found


def _is_shape_variable(name: str) -> bool:
    return any(
        key in name
        for key in ("WORLD_SIZE", "NTASKS", "NNODES", "NUM_NODES", "NPROC", "TASKS_PER_NODE", "HOSTS")
    )


def _int(env: Mapping[str, str], name: str, problems: list[str], default: int | None = None) -> int | None:
    """``env[name]`` as a non-negative integer; a problem (and ``default``) when it is not one."""
    value = env.get(name)
    if value is None or value == "":
        return default
    if not value.strip().isdigit():
        problems.append(f"{name}={value!r} is not a non-negative integer")
        return default
    return int(value)


def _read(env: Mapping[str, str]) -> dict[str, str]:
    """The launcher variables present in ``env``."""
    return {
        k: v
        for k, v in sorted(env.items())
        if any(k == name or (name.endswith("_") and k.startswith(name)) for name in LAUNCHER_VARIABLES)
    }


def slurm_hostnames(nodelist: str) -> list[str]:
    """Host names of a SLURM node list (``node[01-03,07],gpu5``), in order."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain.strip())
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            if not last:
                hosts.append(f"{prefix}{first}")
                continue
            hosts += [f"{prefix}{i:0{len(first)}d}" for i in range(int(first), int(last) + 1)]
    return hosts


def _slurm_tasks_per_node(env: Mapping[str, str], node: int, problems: list[str]) -> int | None:
    """Tasks on node ``node``: ``SLURM_NTASKS_PER_NODE``, else ``SLURM_TASKS_PER_NODE`` (``2(x3),1``)."""
    per_node = _int(env, "SLURM_NTASKS_PER_NODE", problems)
    if per_node is not None:
        return per_node
    counts: list[int] = []
    for count, times in re.findall(r"(\d+)(?:\(x(\d+)\))?", env.get("SLURM_TASKS_PER_NODE", "")):
        counts += [int(count)] * int(times or 1)
    return counts[node] if node < len(counts) else None


def _slurm(env: Mapping[str, str], problems: list[str]) -> dict:
    rank = _int(env, "SLURM_PROCID", problems)
    local = _int(env, "SLURM_LOCALID", problems)
    node = _int(env, "SLURM_NODEID", problems)
    tasks = _int(env, "SLURM_NTASKS", problems, 1) or 1
    nodes = _int(env, "SLURM_NNODES", problems) or _int(env, "SLURM_JOB_NUM_NODES", problems) or 1
    missing = [
        n for n, v in (("SLURM_PROCID", rank), ("SLURM_LOCALID", local), ("SLURM_NODEID", node)) if v is None
    ]
    if missing:
        problems.append(
            f"SLURM_NTASKS={tasks} is set but {', '.join(missing)} not: this process was not started by srun. Start "
            "ftpipe with srun (`srun ftpipe train ...` in the batch script), which starts one task per GPU"
        )
    rank, local, node = rank or 0, local or 0, node or 0
    per_node = _slurm_tasks_per_node(env, node, problems)
    if per_node is None:
        per_node = max(1, tasks // nodes)
        if tasks > 1 and tasks % nodes:
            problems.append(
                f"SLURM_NTASKS={tasks} tasks do not divide over SLURM_NNODES={nodes} nodes: ask for the same "
                "number of tasks on every node (#SBATCH --ntasks-per-node=<GPUs per node>)"
            )
    elif per_node * nodes != tasks:
        problems.append(
            f"SLURM_NTASKS={tasks} is not SLURM_NNODES={nodes} x {per_node} task(s) per node "
            f"(SLURM_NTASKS_PER_NODE={env.get('SLURM_NTASKS_PER_NODE', '-')}, SLURM_TASKS_PER_NODE="
            f"{env.get('SLURM_TASKS_PER_NODE', '-')}): ask for tasks per node (--ntasks-per-node), not a total"
        )
    if rank >= tasks or node >= nodes or local >= per_node:
        problems.append(
            f"SLURM_PROCID={rank}, SLURM_LOCALID={local}, SLURM_NODEID={node} do not fit SLURM_NTASKS={tasks} "
            f"on SLURM_NNODES={nodes} node(s) of {per_node} task(s)"
        )
    for name, own, what in (("RANK", rank, "SLURM_PROCID"), ("LOCAL_RANK", local, "SLURM_LOCALID")):
        if env.get(name, "").isdigit() and int(env[name]) != own:
            problems.append(
                f"{name}={env[name]} contradicts {what}={own}: unset {name} in the job script (srun gives each "
                "task its rank), or start torchrun under srun"
            )
    if env.get("WORLD_SIZE", "").isdigit() and int(env["WORLD_SIZE"]) != tasks:
        problems.append(f"WORLD_SIZE={env['WORLD_SIZE']} contradicts SLURM_NTASKS={tasks}: unset WORLD_SIZE")
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    hosts = slurm_hostnames(nodelist) if nodelist else []
    master = env.get("MASTER_ADDR") or (hosts[0] if hosts else None)
    if master is None and nodes > 1:
        problems.append(
            f"SLURM_NNODES={nodes} but neither MASTER_ADDR nor SLURM_JOB_NODELIST is set: export MASTER_ADDR (the "
            "first node's address) in the batch script"
        )
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    # Lightning's SLURMEnvironment: MASTER_PORT, else 15000 + the job id's last 4 digits
    port = _int(env, "MASTER_PORT", problems)
    if port is None:
        port = 15000 + int(job_id[-4:]) if job_id and job_id[-4:].isdigit() else 12910
    return {
        "launcher": "slurm",
        "cluster": "slurm",
        "rank": rank,
        "local_rank": local,
        "node_rank": node,
        "world_size": tasks,
        "processes_per_node": per_node,
        "num_nodes": nodes,
        "master_addr": master,
        "master_port": port,
        "restart_count": _int(env, "SLURM_RESTART_COUNT", problems, 0) or 0,
        "job_id": job_id,
        "host": env.get("SLURMD_NODENAME") or socket.gethostname(),
        "hosts": tuple(hosts),
    }


def _torchrun(env: Mapping[str, str], problems: list[str]) -> dict:
    missing = [n for n in ("RANK", "LOCAL_RANK", "WORLD_SIZE") if not env.get(n)]
    if missing:
        problems.append(
            f"TORCHELASTIC_RUN_ID is set but {', '.join(missing)} not: start ftpipe as torchrun's command "
            "(`torchrun ... -m ftpipe train ...`), not beside it"
        )
    world = _int(env, "WORLD_SIZE", problems, 1) or 1
    per_node = _int(env, "LOCAL_WORLD_SIZE", problems, world) or world
    nodes = _int(env, "GROUP_WORLD_SIZE", problems, max(1, world // per_node)) or 1
    if per_node * nodes != world:
        problems.append(
            f"WORLD_SIZE={world} is not GROUP_WORLD_SIZE={nodes} nodes x LOCAL_WORLD_SIZE={per_node}: start "
            "the same --nproc-per-node on every node"
        )
    info = {
        "launcher": "torchrun",
        "rank": _int(env, "RANK", problems, 0) or 0,
        "local_rank": _int(env, "LOCAL_RANK", problems, 0) or 0,
        "node_rank": _int(env, "GROUP_RANK", problems, 0) or 0,
        "world_size": world,
        "processes_per_node": per_node,
        "num_nodes": nodes,
        "master_addr": env.get("MASTER_ADDR"),
        "master_port": _int(env, "MASTER_PORT", problems),
        "restart_count": _int(env, "TORCHELASTIC_RESTART_COUNT", problems, 0) or 0,
        "max_restarts": _int(env, "TORCHELASTIC_MAX_RESTARTS", problems, 0) or 0,
        "shared_store": env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
        "job_id": env.get("TORCHELASTIC_RUN_ID"),
    }
    if env.get("SLURM_NTASKS") and env.get("SLURM_JOB_NAME") not in SLURM_INTERACTIVE:
        # torchrun under srun: one srun task (a torchrun agent) per node
        tasks = _int(env, "SLURM_NTASKS", problems, 1) or 1
        slurm_nodes = _int(env, "SLURM_NNODES", problems) or _int(env, "SLURM_JOB_NUM_NODES", problems) or 1
        if tasks != slurm_nodes:
            problems.append(
                f"torchrun runs under srun with SLURM_NTASKS={tasks} on SLURM_NNODES={slurm_nodes} node(s): start "
                "one srun task per node (--ntasks-per-node=1), each a torchrun that starts the node's processes "
                "(--nproc-per-node)"
            )
        info.update(cluster="slurm", job_id=env.get("SLURM_JOB_ID") or info["job_id"])
        info["restart_count"] += _int(env, "SLURM_RESTART_COUNT", problems, 0) or 0
    return info


def _kubeflow(env: Mapping[str, str], problems: list[str]) -> dict:
    """One process per pod, started by the Kubernetes training operator (a PyTorchJob without torchrun)."""
    nproc = _int(env, "PET_NPROC_PER_NODE", problems, 1) or 1
    if nproc > 1:
        problems.append(
            f"the PyTorchJob asks for PET_NPROC_PER_NODE={nproc} processes per pod but the container starts ftpipe "
            "directly: start it as torchrun's command (`torchrun -m ftpipe train ...`), which reads the PET_* "
            "variables and starts that many processes"
        )
    world = _int(env, "WORLD_SIZE", problems, 1) or 1
    rank = _int(env, "RANK", problems, 0) or 0
    if rank >= world:
        problems.append(f"RANK={rank} does not fit WORLD_SIZE={world}")
    return {
        "launcher": "kubeflow",
        "cluster": "kubernetes",
        "rank": rank,
        "local_rank": 0,
        "node_rank": rank,
        "world_size": world,
        "processes_per_node": 1,
        "num_nodes": world,
        "master_addr": env.get("MASTER_ADDR"),
        "master_port": _int(env, "MASTER_PORT", problems),
    }


def _sagemaker(env: Mapping[str, str], problems: list[str]) -> dict:
    """SageMaker's toolkit ran the entry point once per host (ftpipe's launch starts the host's processes)."""
    import json

    current = env.get("SM_CURRENT_HOST", "")
    try:
        hosts = tuple(json.loads(env.get("SM_HOSTS") or "[]"))
    except ValueError:
        problems.append(f"SM_HOSTS={env.get('SM_HOSTS')!r} is not a JSON list of host names")
        hosts = ()
    if current not in hosts:
        problems.append(f"SM_CURRENT_HOST={current!r} is not one of SM_HOSTS={list(hosts)}")
    node = hosts.index(current) if current in hosts else 0
    return {
        "launcher": "sagemaker",
        "cluster": "sagemaker",
        "node_rank": node,
        "num_nodes": max(1, len(hosts)),
        "master_addr": env.get("MASTER_ADDR") or (hosts[0] if hosts else None),
        "master_port": _int(env, "MASTER_PORT", problems, SAGEMAKER_PORT),
        "host": current or socket.gethostname(),
        "hosts": hosts,
    }


def _ftpipe(env: Mapping[str, str], problems: list[str]) -> dict:
    """A process of ftpipe's own launch (Lightning's launcher), or a node of a multi-node launch by hand."""
    local = _int(env, "LOCAL_RANK", problems, 0) or 0
    node = _int(env, "NODE_RANK", problems, 0) or 0
    world = _int(env, "WORLD_SIZE", problems)
    per_node = _int(env, "LOCAL_WORLD_SIZE", problems)
    if per_node is None:  # ftpipe's launch says it (expect_local_processes); one node is all of the world
        per_node = world if world and node == 0 else 1
    rank = _int(env, "RANK", problems)
    if rank is None:
        rank = node * per_node + local
    nodes = max(1, (world or per_node) // max(per_node, 1)) if world else node + 1
    master = env.get("MASTER_ADDR")
    if node > 0 and not master:
        problems.append(
            f"NODE_RANK={node} but MASTER_ADDR is unset: set MASTER_ADDR (the first node's address) and "
            "MASTER_PORT on every node"
        )
    if not any(env.get(n) for n in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR")):
        return {}
    return {
        "launcher": "ftpipe",
        "rank": rank,
        "local_rank": local,
        "node_rank": node,
        "world_size": world or max(rank + 1, nodes * per_node),
        "processes_per_node": per_node,
        "num_nodes": nodes,
        "master_addr": master,
        "master_port": _int(env, "MASTER_PORT", problems),
    }


def from_environ(environ: Mapping[str, str] | None = None) -> Launch:
    """The launch that ``environ`` (this process's environment by default) describes; never raises: what
    contradicts is in :attr:`Launch.problems`."""
    env = os.environ if environ is None else environ
    problems: list[str] = []
    info: dict = {}
    slurm = bool(env.get("SLURM_NTASKS")) and env.get("SLURM_JOB_NAME") not in SLURM_INTERACTIVE
    sagemaker = bool(env.get("SM_CURRENT_HOST") and env.get("SM_HOSTS"))
    mpi = bool(env.get("OMPI_COMM_WORLD_SIZE") or env.get("PMI_RANK"))
    if mpi and not env.get("TORCHELASTIC_RUN_ID") and not slurm:
        problems.append(
            "started by mpirun (OMPI_COMM_WORLD_* / PMI_RANK): ftpipe's processes are started by torchrun, srun, "
            "the Kubernetes operator, SageMaker or ftpipe itself; run `torchrun ... -m ftpipe train` on each "
            "node instead"
        )
    if env.get("TORCHELASTIC_RUN_ID"):
        info = _torchrun(env, problems)
        if sagemaker:
            sm = _sagemaker(env, problems)
            info.update(cluster="sagemaker", host=sm["host"], hosts=sm["hosts"])
    elif slurm:
        info = _slurm(env, problems)
    elif (
        env.get("KUBERNETES_SERVICE_HOST")
        and env.get("RANK")
        and env.get("WORLD_SIZE")
        and "LOCAL_RANK" not in env
    ):
        info = _kubeflow(env, problems)
    elif sagemaker:
        info = _sagemaker(env, problems)
        own = _ftpipe(
            {**env, "NODE_RANK": str(info["node_rank"])}, []
        )  # the host's processes (ftpipe's launch)
        per_node = own["processes_per_node"]
        info.update(
            rank=own["rank"],
            local_rank=own["local_rank"],
            processes_per_node=per_node,
            world_size=per_node * info["num_nodes"],
        )
    else:
        info = _ftpipe(env, problems)
    if info.get("cluster", "local") == "local" and env.get("KUBERNETES_SERVICE_HOST"):
        info["cluster"] = "kubernetes"
    return Launch(**info, variables=_read(env), problems=tuple(problems))


_cache: tuple[tuple[tuple[str, str], ...], Launch] | None = None


def current() -> Launch:
    """This process's launch (read again only when its launcher variables change)."""
    global _cache
    key = tuple(_read(os.environ).items())
    if _cache is None or _cache[0] != key:
        _cache = (key, from_environ())
    return _cache[1]


def check_launch(num_nodes: int | None = None, gpus_per_node: int | None = None) -> Launch:
    """This process's launch; a LaunchError naming the variables when they contradict each other or the
    configuration's ``num_nodes`` x ``gpus_per_node``."""
    launch = current()
    problems = list(launch.problems)
    if num_nodes is not None and gpus_per_node is not None:
        problems += launch.shape_problems(num_nodes, gpus_per_node)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise LaunchError(f"the launch cannot start ({launch.launcher}, host {launch.host}):\n{lines}")
    return launch


def expect_local_processes(count: int) -> None:
    """ftpipe's own launch: the processes it starts on this node learn how many there are (torchrun's
    ``LOCAL_WORLD_SIZE``), so that each knows its global rank before the process group exists."""
    if current().launcher in ("single", "ftpipe", "sagemaker"):
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(count))


def remember_rank(rank: int) -> None:
    """After the process group is gone, this process keeps its rank (log tags, rank-0 work)."""
    os.environ["RANK"] = str(rank)


def set_rendezvous(master_addr: str, master_port: int, node_rank: int) -> None:
    """The rendezvous of ftpipe's own multi-node launch (a launcher's own values win)."""
    os.environ.setdefault("MASTER_ADDR", master_addr)
    os.environ.setdefault("MASTER_PORT", str(master_port))
    os.environ.setdefault("NODE_RANK", str(node_rank))


@contextlib.contextmanager
def without_worker_variables() -> Iterator[None]:
    """This process's environment without the launcher's worker variables (restored afterwards), for a
    process started meanwhile that is no rank of the job."""
    saved = {k: os.environ.pop(k) for k in WORKER_VARIABLES if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)
