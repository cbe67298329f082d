"""``ftpipe prepare``: raw rows in, ``training/validation/test.jsonl`` out, prepared once.

Only global rank 0 prepares. With a process group rank 0 posts its outcome (done, or its error) in the
group's key-value store, and the other ranks poll the store without blocking: no collective, so a long
preparation never meets the process group's timeout, only ``prepare_timeout_s``. Without a group they
poll for the ``.data_ready`` marker. A folder whose
manifest has the same settings hash and whose source files kept their size and mtime is reused.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from ftpipe.config.mix import SourceSettings, source_settings
from ftpipe.config.paths import check_output_folder, prepare_settings, prepared_data_dir, settings_hash
from ftpipe.config.schema import PipelineConfig
from ftpipe.data.build import READY_MARKER, SPLIT_FILES, build_prepared
from ftpipe.data.errors import DataError, PrepareTimeoutError
from ftpipe.data.manifest import read_manifest
from ftpipe.data.sources import Source, resolve_source, source_fingerprint
from ftpipe.utils.logging import get_logger, global_rank
from ftpipe.utils.world import distributed, local_rank

log = get_logger(__name__)
_POLL_S = 0.5
#: How long rank 0 waits for the others to read its outcome (they poll every ``_POLL_S``).
_ACK_WAIT_S = 60.0


@dataclass(frozen=True)
class PreparedData:
    """The prepared folder and its three JSONL files.

    ``reused`` is True when this call wrote nothing: the files were already prepared, or (on ranks
    other than 0) rank 0 prepared them.
    """

    folder: Path
    train_file: Path
    val_file: Path
    test_file: Path
    counts: dict[str, int]
    reused: bool


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSON Lines file (blank lines skipped); errors name the file and the line."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {lineno}: unparsable JSON ({err.msg})") from err
    return rows


def _result(folder: Path, manifest: dict, reused: bool) -> PreparedData:
    return PreparedData(
        folder=folder,
        train_file=folder / SPLIT_FILES["train"],
        val_file=folder / SPLIT_FILES["validation"],
        test_file=folder / SPLIT_FILES["test"],
        counts=dict(manifest["counts"]),
        reused=reused,
    )


def check_prepared(
    folder: Path, digest: str, fingerprint: list[dict] | None
) -> tuple[dict | None, str | None]:
    """``(manifest, None)`` when ``folder`` is complete and current, else ``(None, why)``.

    ``why`` is None for a folder never prepared; ``fingerprint`` None skips the source check.
    """
    if not (folder / READY_MARKER).is_file():
        leftovers = folder.is_dir() and any(folder.iterdir())
        return (
            None,
            f"an earlier preparation of {folder} did not finish (no {READY_MARKER})" if leftovers else None,
        )
    manifest = read_manifest(folder)
    if manifest is None or any(not (folder / name).is_file() for name in SPLIT_FILES.values()):
        return None, f"{folder} is incomplete (manifest or split files missing)"
    if manifest.get("settings_hash") != digest:
        return None, f"the prepare settings changed (hash {manifest.get('settings_hash')} -> {digest})"
    if fingerprint is not None and manifest["source"]["files"] != fingerprint:
        before = {f["path"]: f for f in manifest["source"]["files"]}
        now = {f["path"]: f for f in fingerprint}
        changed = sorted(p for p in before.keys() | now.keys() if before.get(p) != now.get(p))
        return (
            None,
            f"the source changed since it was prepared ({', '.join(changed[:3])}: size or mtime differs)",
        )
    return manifest, None


def _resolve_sources(cfg: PipelineConfig) -> list[tuple[SourceSettings, Source]]:
    """Each configured source resolved; a missing local path is a DataError naming the entry."""
    resolved = []
    for spec in source_settings(cfg.data):
        try:
            resolved.append((spec, resolve_source(spec.data.dataset)))
        except DataError as err:
            if spec.origin == "dataset":
                raise
            raise DataError(f"{spec.origin} ({spec.name}): {err}") from err
    return resolved


def _fingerprints(resolved: list[tuple[SourceSettings, Source]]) -> list[list[dict]]:
    """Each source's files with their size and mtime."""
    return [source_fingerprint(source) for _, source in resolved]


def _flat(fingerprints: list[list[dict]]) -> list[dict]:
    return [entry for files in fingerprints for entry in files]


def _prepare_rank0(cfg: PipelineConfig, folder: Path) -> PreparedData:
    data = cfg.data
    resolved = _resolve_sources(cfg)
    settings = prepare_settings(data)
    digest = settings_hash(settings)
    check_output_folder("data_dir", folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder.parent / f".{folder.name}.lock"
    try:
        lock = FileLock(str(lock_path), timeout=data.prepare_timeout_s)
        lock.acquire()
    except Timeout as err:
        raise PrepareTimeoutError(
            f"another process held {lock_path} (preparing {folder}) for over {data.prepare_timeout_s:g} s; "
            "wait for it, raise prepare_timeout_s, or delete the lock file if no ftpipe process is running"
        ) from err
    try:
        fingerprints = _fingerprints(resolved)
        manifest, why = check_prepared(folder, digest, _flat(fingerprints))
        if manifest is not None:
            log.info("Reusing prepared data in %s (same settings %s, source unchanged)", folder, digest)
            return _result(folder, manifest, reused=True)
        if why:
            log.info("Preparing again: %s", why)
        names = ", ".join(spec.data.dataset for spec, _ in resolved)
        log.info("Preparing %s into %s", names, folder)
        manifest = build_prepared(cfg, resolved, fingerprints, settings, digest, folder)
        return _result(folder, manifest, reused=False)
    finally:
        lock.release()


def _wait_ready(cfg: PipelineConfig, folder: Path, rank: int) -> PreparedData:
    """Poll for rank 0's marker (no process group); a clear error after ``prepare_timeout_s``."""
    digest = settings_hash(prepare_settings(cfg.data))
    try:
        fingerprint: list[dict] | None = _flat(_fingerprints(_resolve_sources(cfg)))
    except (DataError, OSError):
        fingerprint = None  # the source may live only on rank 0's machine
    timeout = cfg.data.prepare_timeout_s
    deadline = time.monotonic() + timeout
    while True:
        manifest, _ = check_prepared(folder, digest, fingerprint)
        if manifest is not None:
            return _result(folder, manifest, reused=True)
        if time.monotonic() >= deadline:
            raise PrepareTimeoutError(
                f"rank {rank}: waited {timeout:g} s for rank 0 (with prepare_per_node: this node's first process) to prepare the data in {folder}, "
                "but no "
                f"complete preparation ({READY_MARKER} with these settings) appeared. Check rank 0's log for "
                "an error; raise prepare_timeout_s for a large data set; make data_dir a folder all ranks "
                "share, or run `ftpipe prepare` with the same configuration before training."
            )
        time.sleep(min(_POLL_S, max(deadline - time.monotonic(), 0.0)))


def _store_key(cfg: PipelineConfig, folder: Path) -> str:
    """The key of this preparation's outcome: the settings, the folder and the launcher's restart round (a
    torchrun restart keeps its store, and a new round must not read the old round's outcome)."""
    digest = settings_hash(prepare_settings(cfg.data))
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"ftpipe/prepare/{digest}/{folder.name}/{restart}"


def _post(store, key: str, status: str) -> None:
    """Rank 0: post the outcome, then wait (at most ``_ACK_WAIT_S``) until every other rank has read it,
    so that the store (served by rank 0) outlives their reading even if rank 0 exits right after."""
    import torch.distributed as dist

    store.set(key, status)
    others = dist.get_world_size() - 1
    deadline = time.monotonic() + _ACK_WAIT_S
    while store.add(f"{key}/read", 0) < others and time.monotonic() < deadline:
        time.sleep(_POLL_S / 5)


def _prepare_in_group(cfg: PipelineConfig, folder: Path, rank: int) -> PreparedData:
    """Rank 0 prepares and posts its outcome in the process group's key-value store; the other ranks poll
    the store (``check``, which does not block), so they wait up to ``prepare_timeout_s`` whatever the
    group's own timeout (``process_group_timeout_s``), and learn of rank 0's failure at once.

    No extra group is created: a new group's rendezvous keys can outlive a ``torchrun`` restart and
    point the restarted ranks at dead peers.
    """
    from ftpipe.compat import default_store

    store = default_store()
    if store is None:  # pragma: no cover - every gloo / NCCL group ftpipe starts has a store
        return _wait_ready(cfg, folder, rank)
    key = _store_key(cfg, folder)
    if rank == 0:
        try:
            result = _prepare_rank0(cfg, folder)
        except Exception as err:
            _post(store, key, f"{type(err).__name__}: {err}")
            raise
        _post(store, key, "ok")
        return result
    timeout = cfg.data.prepare_timeout_s
    deadline = time.monotonic() + timeout
    log.info(
        "rank %d: waiting for rank 0 to prepare the data (up to prepare_timeout_s = %g s; no collective, so "
        "the process group's timeout does not apply)",
        rank,
        timeout,
    )
    while not store.check([key]):
        if time.monotonic() >= deadline:
            raise PrepareTimeoutError(
                f"rank {rank}: rank 0 did not finish preparing the data in {folder} within prepare_timeout_s "
                f"({timeout:g} s); check rank 0's log, raise prepare_timeout_s for a large data set, or run "
                "`ftpipe prepare` with the same configuration first"
            )
        time.sleep(_POLL_S)
    status = store.get(key).decode("utf-8", errors="replace")
    store.add(f"{key}/read", 1)
    if status != "ok":
        raise DataError(f"rank {rank}: rank 0 failed to prepare the data in {folder}: {status}")
    manifest = read_manifest(folder)
    if manifest is None or not (folder / READY_MARKER).is_file():
        raise DataError(
            f"rank {rank}: rank 0 prepared {folder}, but this rank cannot see it; "
            "data_dir must be a folder that every node shares (or set prepare_per_node)"
        )
    return _result(folder, manifest, reused=True)


def _given_prepared(folder: Path) -> PreparedData:
    """``prepared_dir``: the three split files as they are (counted, not rewritten)."""
    missing = [name for name in SPLIT_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"prepared_dir {folder}: {', '.join(missing)} missing; it must hold "
            f"{', '.join(SPLIT_FILES.values())} (as `ftpipe prepare` writes them), or unset prepared_dir "
            "and give the raw data as dataset"
        )
    counts = {}
    for split, name in SPLIT_FILES.items():
        with open(folder / name, encoding="utf-8") as fh:
            counts[split] = sum(1 for line in fh if line.strip())
    if counts["train"] == 0:
        raise DataError(f"prepared_dir {folder}: {SPLIT_FILES['train']} has no rows")
    return _result(folder, {"counts": counts}, reused=True)


def prepare_data(cfg: PipelineConfig) -> PreparedData:
    """Prepare (or reuse) the data set of ``cfg`` in ``prepared_data_dir(cfg.data)`` on rank 0 (on
    the first process of every node with ``prepare_per_node``), or take ``prepared_dir`` as it is."""

    folder = prepared_data_dir(cfg.data)
    rank = global_rank()
    if cfg.data.prepared_dir:
        result = _given_prepared(folder)
    elif cfg.data.prepare_per_node:
        leader = local_rank() == 0
        result = _prepare_rank0(cfg, folder) if leader else _wait_ready(cfg, folder, rank)
    elif distributed():
        result = _prepare_in_group(cfg, folder, rank)
    elif rank == 0:
        result = _prepare_rank0(cfg, folder)
    else:
        result = _wait_ready(cfg, folder, rank)
    counts = ", ".join(f"{k} {v}" for k, v in result.counts.items())
    log.info("Prepared data (%s) in %s: %s", "reused" if result.reused else "new", folder, counts)
    return result
