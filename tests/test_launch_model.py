"""The launch model: who a process is, read from the variables each launcher sets, the same as Lightning's
cluster environments say, and one message naming the variables when they contradict each other."""

from __future__ import annotations

import pytest

from ftpipe.utils.launch import Launch, LaunchError, check_launch, from_environ, slurm_hostnames

pytestmark = pytest.mark.timeout(60)


def srun_env(proc: int, nodes: int, per_node: int, **extra: str) -> dict[str, str]:
    """The variables ``srun`` gives task ``proc`` of ``nodes`` x ``per_node`` tasks (block distribution)."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "ftpipe",
        "SLURM_JOB_NODELIST": f"gpu[01-{nodes:02d}]",
        "SLURM_NODELIST": f"gpu[01-{nodes:02d}]",
        "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_NTASKS": str(nodes * per_node),
        "SLURM_NPROCS": str(nodes * per_node),
        "SLURM_NTASKS_PER_NODE": str(per_node),
        "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})",
        "SLURM_PROCID": str(proc),
        "SLURM_LOCALID": str(proc % per_node),
        "SLURM_NODEID": str(proc // per_node),
        "SLURMD_NODENAME": f"gpu{proc // per_node + 1:02d}",
        **extra,
    }


def torchrun_env(rank: int, nodes: int, per_node: int, **extra: str) -> dict[str, str]:
    """The variables torchrun gives worker ``rank``."""
    return {
        "TORCHELASTIC_RUN_ID": "job",
        "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "1",
        "RANK": str(rank),
        "LOCAL_RANK": str(rank % per_node),
        "GROUP_RANK": str(rank // per_node),
        "WORLD_SIZE": str(nodes * per_node),
        "LOCAL_WORLD_SIZE": str(per_node),
        "GROUP_WORLD_SIZE": str(nodes),
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
        **extra,
    }


def pod_env(index: int, replicas: int, **extra: str) -> dict[str, str]:
    """What the training operator gives pod ``index`` of a PyTorchJob (master 0, workers 1..)."""
    return {
        "KUBERNETES_SERVICE_HOST": "10.96.0.1",
        "MASTER_ADDR": "job-master-0",
        "MASTER_PORT": "23456",
        "WORLD_SIZE": str(replicas),
        "RANK": str(index),
        "PET_MASTER_ADDR": "job-master-0",
        "PET_MASTER_PORT": "23456",
        "PET_NNODES": str(replicas),
        "PET_NODE_RANK": str(index),
        **extra,
    }


def _shape(launch: Launch) -> tuple:
    return (
        launch.launcher,
        launch.cluster,
        launch.rank,
        launch.local_rank,
        launch.node_rank,
        launch.world_size,
        launch.processes_per_node,
        launch.num_nodes,
    )


def test_no_launcher_is_one_process():
    launch = from_environ({})
    assert _shape(launch) == ("single", "local", 0, 0, 0, 1, 1, 1) and launch.problems == ()


@pytest.mark.parametrize(
    ("nodes", "per_node", "proc", "expected"),
    [
        (2, 1, 1, ("slurm", "slurm", 1, 0, 1, 2, 1, 2)),  # the second node's task is its node's first
        (1, 2, 1, ("slurm", "slurm", 1, 1, 0, 2, 2, 1)),
        (2, 4, 6, ("slurm", "slurm", 6, 2, 1, 8, 4, 2)),
    ],
)
def test_srun_tasks(nodes, per_node, proc, expected):
    launch = from_environ(srun_env(proc, nodes, per_node))
    assert _shape(launch) == expected and launch.problems == ()
    assert launch.node_leader == (proc % per_node == 0)
    assert (launch.master_addr, launch.master_port, launch.job_id) == ("gpu01", 15000 + 4242, "4242")
    assert launch.hosts == tuple(f"gpu{i + 1:02d}" for i in range(nodes))


def test_srun_tasks_per_node_from_the_compact_form():
    env = srun_env(2, 2, 2)
    del env["SLURM_NTASKS_PER_NODE"]
    launch = from_environ(env)
    assert (launch.processes_per_node, launch.local_rank, launch.node_rank) == (
        2,
        0,
        1,
    ) and not launch.problems


def test_an_interactive_allocation_is_no_slurm_launch():
    launch = from_environ(srun_env(0, 1, 2, SLURM_JOB_NAME="bash"))
    assert launch.launcher == "single"


def test_slurm_requeue_is_a_restart():
    launch = from_environ(
        srun_env(0, 2, 1, SLURM_RESTART_COUNT="1", MASTER_ADDR="10.1.1.1", MASTER_PORT="4000")
    )
    assert (launch.restart_count, launch.master_addr, launch.master_port) == (1, "10.1.1.1", 4000)


def test_node_lists():
    assert slurm_hostnames("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    assert slurm_hostnames("a,b") == ["a", "b"]
    assert slurm_hostnames("n[8-10]") == ["n8", "n9", "n10"]


def test_torchrun_workers():
    launch = from_environ(torchrun_env(3, 2, 2, TORCHELASTIC_RESTART_COUNT="1"))
    assert _shape(launch) == ("torchrun", "local", 3, 1, 1, 4, 2, 2) and not launch.problems
    assert (launch.restart_count, launch.max_restarts, launch.master_addr) == (1, 1, "10.0.0.1")


def test_torchrun_under_srun_is_torchrun_on_slurm():
    env = {**srun_env(1, 2, 1), **torchrun_env(5, 2, 4)}
    launch = from_environ(env)
    assert _shape(launch) == ("torchrun", "slurm", 5, 1, 1, 8, 4, 2) and not launch.problems
    assert launch.job_id == "4242"


def test_torchrun_under_srun_with_a_task_per_gpu_is_refused():
    env = {**srun_env(1, 1, 2), **torchrun_env(1, 1, 2)}
    problems = from_environ(env).problems
    assert len(problems) == 1 and "SLURM_NTASKS=2 on SLURM_NNODES=1" in problems[0]
    assert "--ntasks-per-node=1" in problems[0]


def test_training_operator_pods():
    launch = from_environ(pod_env(1, 2))
    assert _shape(launch) == ("kubeflow", "kubernetes", 1, 0, 1, 2, 1, 2) and not launch.problems
    # the same pod running torchrun: torchrun's variables describe the worker
    inside = from_environ({**pod_env(1, 2, PET_NPROC_PER_NODE="2"), **torchrun_env(3, 2, 2)})
    assert _shape(inside) == ("torchrun", "kubernetes", 3, 1, 1, 4, 2, 2) and not inside.problems


def test_sagemaker_hosts():
    env = {"SM_HOSTS": '["algo-1", "algo-2"]', "SM_CURRENT_HOST": "algo-2"}
    launch = from_environ(env)
    assert (launch.launcher, launch.node_rank, launch.num_nodes, launch.master_addr) == (
        "sagemaker",
        1,
        2,
        "algo-1",
    )
    assert launch.rank == 1 and launch.hosts == ("algo-1", "algo-2")
    # ftpipe's launch on that host: 2 processes each
    child = from_environ({**env, "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "NODE_RANK": "1"})
    assert (child.rank, child.local_rank, child.world_size) == (3, 1, 4)
    under_torchrun = from_environ({**env, **torchrun_env(2, 2, 1)})
    assert (under_torchrun.launcher, under_torchrun.cluster, under_torchrun.rank) == (
        "torchrun",
        "sagemaker",
        2,
    )


def test_ftpipe_own_launch():
    child = from_environ({"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"})
    assert _shape(child) == ("ftpipe", "local", 1, 1, 0, 2, 2, 1)
    second_node = from_environ(
        {"LOCAL_RANK": "0", "NODE_RANK": "1", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "4", "MASTER_ADDR": "h0"}
    )
    assert _shape(second_node) == ("ftpipe", "local", 2, 0, 1, 4, 2, 2)


@pytest.mark.parametrize(
    ("env", "names"),
    [
        (srun_env(1, 2, 1, RANK="0"), ["RANK=0", "SLURM_PROCID=1"]),
        (srun_env(1, 1, 2, WORLD_SIZE="4"), ["WORLD_SIZE=4", "SLURM_NTASKS=2"]),
        ({**srun_env(1, 2, 1), "SLURM_NTASKS": "3"}, ["SLURM_NTASKS=3", "SLURM_NNODES=2"]),
        (
            {k: v for k, v in srun_env(1, 2, 1).items() if "NODELIST" not in k},
            ["MASTER_ADDR", "SLURM_JOB_NODELIST"],
        ),
        (
            {k: v for k, v in srun_env(0, 1, 2).items() if k != "SLURM_PROCID"},
            ["SLURM_PROCID", "srun"],
        ),
        (
            {**torchrun_env(1, 2, 2), "WORLD_SIZE": "3"},
            ["WORLD_SIZE=3", "GROUP_WORLD_SIZE=2", "LOCAL_WORLD_SIZE=2"],
        ),
        (pod_env(0, 2, PET_NPROC_PER_NODE="8"), ["PET_NPROC_PER_NODE=8", "torchrun"]),
        ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, ["NODE_RANK=1", "MASTER_ADDR"]),
        ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}, ["mpirun", "torchrun"]),
        ({"SM_HOSTS": '["algo-1"]', "SM_CURRENT_HOST": "algo-9"}, ["SM_CURRENT_HOST='algo-9'", "SM_HOSTS"]),
    ],
)
def test_contradictions_name_their_variables(env, names, monkeypatch):
    problems = from_environ(env).problems
    assert problems, f"no problem found in {env}"
    text = " ".join(problems)
    for name in names:
        assert name in text, f"{name!r} not named in: {text}"
    _set_only(monkeypatch, env)
    with pytest.raises(LaunchError) as err:
        check_launch()
    assert err.value.exit_code == 2 and names[0] in str(err.value)


def test_the_configuration_must_match_what_the_launcher_started(monkeypatch):
    _set_only(monkeypatch, srun_env(0, 2, 1))
    with pytest.raises(LaunchError) as err:
        check_launch(num_nodes=1, gpus_per_node=2)
    message = str(err.value)
    assert "num_nodes is 1 but slurm started 2 node(s)" in message and "set --num_nodes 2" in message
    assert "gpus_per_node is 2 but slurm started 1 process(es) per node" in message
    assert "SLURM_NTASKS=2" in message
    assert check_launch(num_nodes=2, gpus_per_node=1).rank == 0
    # ftpipe's own launch starts what the configuration says: nothing to compare
    _set_only(monkeypatch, {})
    assert check_launch(num_nodes=1, gpus_per_node=8).launcher == "single"


def _set_only(monkeypatch, env: dict[str, str]) -> None:
    """This process's environment without any launcher variable, plus ``env``; on a copy of the environment,
    so that what Lightning's cluster environments write into it (SLURM's ``MASTER_ADDR`` / ``MASTER_PORT``)
    is gone after the test, like the rest."""
    import os

    from ftpipe.utils.launch import LAUNCHER_VARIABLES

    monkeypatch.setattr(os, "environ", dict(os.environ))
    for name in list(os.environ):
        if any(name == v or (v.endswith("_") and name.startswith(v)) for v in LAUNCHER_VARIABLES):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize(
    ("env", "cls_name"),
    [
        (srun_env(1, 2, 1), "SLURMEnvironment"),
        (srun_env(3, 2, 2), "SLURMEnvironment"),
        ({**srun_env(1, 2, 1), **torchrun_env(3, 2, 2)}, "TorchElasticEnvironment"),
        (torchrun_env(1, 2, 1), "TorchElasticEnvironment"),
        (pod_env(1, 2), "KubeflowEnvironment"),
    ],
)
def test_lightning_is_given_the_cluster_environment_that_agrees(env, cls_name, monkeypatch):
    """The environment ftpipe hands the Trainer says what the launch model says (Lightning's own choice
    would take SLURM's task numbers under srun + torchrun, and cannot detect the training operator)."""
    from ftpipe.distributed import cluster_environment

    _set_only(monkeypatch, env)
    launch = from_environ(env)
    lightning = cluster_environment()
    assert type(lightning).__name__ == cls_name
    assert (
        lightning.global_rank(),
        lightning.local_rank(),
        lightning.node_rank(),
        lightning.world_size(),
    ) == (
        launch.rank,
        launch.local_rank,
        launch.node_rank,
        launch.world_size,
    )
    assert (lightning.main_address, lightning.main_port) == (launch.master_addr, launch.master_port)
    if cls_name == "SLURMEnvironment":
        assert lightning.auto_requeue is False  # ftpipe stops and saves; the batch script requeues


def test_ftpipe_launch_leaves_lightning_its_default(monkeypatch):
    from ftpipe.distributed import cluster_environment

    _set_only(monkeypatch, {})
    assert cluster_environment() is None
