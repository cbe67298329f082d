"""The package's structure rules, checked on the source."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ftpipe"

#: The ``FTPIPE_*`` environment variables that are user settings, and the one module that reads each.
#: Fault injection is configuration (the ``debug`` section, ``ftpipe.train.faults``), never environment.
USER_SETTINGS = {
    "FTPIPE_CACHE": "model/embedded.py",  # where the embedded model is unpacked
    # the serving container's settings (SageMaker configures an endpoint through its environment)
    "FTPIPE_MAX_NEW_TOKENS_LIMIT": "model/serving_handler.py",
    "FTPIPE_DEVICE_MAP": "model/serving_handler.py",
    "FTPIPE_TRUST_REMOTE_CODE": "model/serving_handler.py",
    # glibc's malloc defaults instead of ftpipe's tunables: read before any configuration exists
    "FTPIPE_DEFAULT_MALLOC": "utils/allocator.py",
}


def _sources() -> dict[str, str]:
    return {str(p.relative_to(PACKAGE)): p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py")}


@pytest.mark.timeout(30)
def test_no_ftpipe_environment_variable_is_read_but_the_user_settings():
    found = {
        (name, path)
        for path, text in _sources().items()
        for name in re.findall(r"""["'](FTPIPE_[A-Z0-9_]+)["']""", text)  # names in code, not in prose
    }
    assert found, "the scan found nothing: is the package where this test looks?"
    unexpected = sorted((name, path) for name, path in found if USER_SETTINGS.get(name) != path)
    assert unexpected == [], "read fault and debug switches from the `debug` section (ftpipe.train.faults)"


def _package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.mark.timeout(30)
def test_no_module_imports_a_private_name_of_another_package():
    import ast

    offenders = []
    for path, text in _sources().items():
        module = "ftpipe." + path.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ftpipe"):
                for alias in node.names:
                    private = alias.name.startswith("_") and not alias.name.startswith("__")
                    if private and _package_of(node.module) != _package_of(module):
                        offenders.append(f"{module}: from {node.module} import {alias.name}")
    assert offenders == [], "make the name public in its package, or move it to where both use it"


#: Private names of other libraries that ftpipe uses outside ftpipe/compat.py, each with its reason.
OTHER_PRIVATE = {
    "_attn_implementation": "transformers: the attention kernel a model config carries",
    "_create_training_job_args": "SageMaker SDK: the request a dry run prints (sagemaker/sdk.py)",
    "_latest_training_job": "SageMaker SDK: the submitted job (sagemaker/sdk.py)",
    "_version": "torch: a tensor's in-place version counter, what autograd checks saved tensors against "
    "(model/recompute.py checks a recipe's inputs the same way)",
    "_base": "torch: the tensor a view was made from (model/recompute.py rebuilds views of a recomputed tensor)",
}
#: Lightning internals that subclasses reach through ``self``: only ftpipe/compat.py may name them.
LIGHTNING_INTERNALS = {
    "_save_checkpoint",
    "_last_global_step_saved",
    "_last_checkpoint_saved",
    "_save_last_checkpoint",
    "_monitor_candidates",
    "_setup_model",
    "_activation_checkpointing_kwargs",
}


@pytest.mark.timeout(30)
def test_lightning_and_torch_internals_are_named_in_the_compat_module_only():
    import ast

    offenders = []
    for path, text in _sources().items():
        if path == "compat.py":
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and not (node.module or "ftpipe").startswith("ftpipe"):
                offenders += [
                    f"{path}:{node.lineno}: from {node.module} import {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
            if (
                not isinstance(node, ast.Attribute)
                or not node.attr.startswith("_")
                or node.attr.startswith("__")
            ):
                continue
            on_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if node.attr in LIGHTNING_INTERNALS or not (
                on_self or node.attr in OTHER_PRIVATE or node.attr.startswith("_ftpipe")
            ):
                offenders.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == [], "use the public API, or put the internal into ftpipe/compat.py"


#: Launcher variables (exact names, and the prefixes of whole families): only ftpipe/utils/launch.py reads
#: them; every other module asks its launch model (``ftpipe.utils.launch.current()``).
LAUNCHER_NAME = re.compile(
    r"(RANK|LOCAL_RANK|WORLD_SIZE|LOCAL_WORLD_SIZE|NODE_RANK|GROUP_RANK|GROUP_WORLD_SIZE|MASTER_ADDR|MASTER_PORT"
    r"|SM_HOSTS|SM_CURRENT_HOST|KUBERNETES_SERVICE_HOST|PMI_RANK"
    r"|(SLURM|SLURMD|TORCHELASTIC|PET|OMPI_COMM_WORLD|JSM_NAMESPACE)_[A-Z_]+)"
)


@pytest.mark.timeout(30)
def test_no_module_but_the_launch_model_reads_launcher_variables():
    import ast

    found = []
    for path, text in _sources().items():
        for node in ast.walk(ast.parse(text)):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and LAUNCHER_NAME.fullmatch(node.value)
            ):
                found.append((path, node.lineno, node.value))
    assert any(path == "utils/launch.py" for path, _, _ in found), (
        "the scan found nothing: is the package here?"
    )
    offenders = [f"{path}:{line}: {name}" for path, line, name in found if path != "utils/launch.py"]
    assert offenders == [], "ask ftpipe.utils.launch.current() (rank, local rank, node, restarts, launcher)"
