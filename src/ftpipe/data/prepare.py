"""``ftpipe prepare``: raw rows in, ``training/validation/test.jsonl`` out, prepared once.

Only global rank 0 prepares. With a process group rank 0 posts its outcome (done, or its error) in the
group's key-value store, and the other ranks poll the store without blocking: no collective, so a long
preparation never meets the process group's timeout, only ``prepare_timeout_s``. Without a group they
poll for the ``.data_ready`` marker. A folder whose
manifest has the same settings hash and whose source files kept their size and mtime (and content, for
small files) is reused. A new preparation is written into a staging folder beside the folder and swapped
in only when complete, so a failure (a full disk, a kill) leaves the earlier splits whole.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from filelock import FileLock, Timeout

from ftpipe.config.mix import SourceSettings, source_settings
from ftpipe.config.paths import (
    check_output_folder,
    looks_local,
    prepare_settings,
    prepared_data_dir,
    settings_hash,
)
from ftpipe.config.schema import PipelineConfig
from ftpipe.data import build as build_module
from ftpipe.data import chat as chat_module
from ftpipe.data import formats as formats_module
from ftpipe.data import jsonscan as jsonscan_module
from ftpipe.data import mix as mix_module
from ftpipe.data import preference as preference_module
from ftpipe.data import sources as sources_module
from ftpipe.data.build import READY_MARKER, SPLIT_FILES, build_prepared
from ftpipe.data.errors import DataError, PrepareTimeoutError
from ftpipe.data.manifest import MANIFEST_NAME, PREPARED_KEYS, read_manifest
from ftpipe.data.preference import PAIR_KEYS, PAIR_OBJECTIVES, is_pair_record
from ftpipe.data.sources import Source, resolve_source, source_fingerprint
from ftpipe.utils.folders import recover, staging_dir, swap_in
from ftpipe.utils.launch import current as current_launch
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
            f"the source changed since it was prepared ({', '.join(changed[:3])}: size, mtime or content "
            "differs)",
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


def _resolved(path: Path) -> Path:
    try:
        return path.expanduser().resolve()
    except (OSError, RuntimeError):  # a symlink loop: the sources name it
        return Path(os.path.abspath(path.expanduser()))


def _glob_reaches(pattern: list[str], below: tuple[str, ...]) -> bool:
    """Whether the glob components ``pattern`` (from its fixed folder on) can match a file inside a
    sub-folder of the folder ``below`` (relative to that fixed folder)."""
    if "**" in pattern and not below:
        return True
    if not below:
        return len(pattern) > 1
    if not pattern:
        return False
    if pattern[0] == "**":
        return _glob_reaches(pattern[1:], below) or _glob_reaches(pattern, below[1:])
    return fnmatchcase(below[0], pattern[0]) and _glob_reaches(pattern[1:], below[1:])


def _source_folder_holding(item: str, data_dir: Path) -> Path | None:
    """The folder of the local source ``item`` (a folder, or a glob's fixed folder) that holds
    ``data_dir`` such that the source would read the prepared files; None when there is none."""
    path = Path(item).expanduser()
    if any(c in item for c in "*?["):
        parts = path.parts
        fixed = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
        root = _resolved(Path(*parts[:fixed]) if fixed else Path("."))
        if (data_dir == root or root in data_dir.parents) and _glob_reaches(
            list(parts[fixed:]), data_dir.relative_to(root).parts
        ):
            return root
        return None
    if path.is_dir():
        root = _resolved(path)
        if data_dir == root or root in data_dir.parents:
            return root
    return None


def check_data_dir_outside_sources(cfg: PipelineConfig) -> None:
    """Refuse a ``data_dir`` equal to or inside a local source's folder (or a glob's folder it reaches):
    the next run would read the prepared files back as source data. Checked before anything is written."""
    data_dir = _resolved(Path(cfg.data.data_dir))
    for spec in source_settings(cfg.data):
        given = spec.data.dataset.strip()
        if not looks_local(given):
            continue
        for item in (s.strip() for s in given.split(",") if s.strip()):
            root = _source_folder_holding(item, data_dir)
            if root is not None:
                field = "dataset" if spec.origin == "dataset" else f"{spec.origin}.dataset"
                raise DataError(
                    f"data_dir: {cfg.data.data_dir} is inside the folder {root} of {field} {item!r}, so the "
                    "prepared files would be read back as source data on the next run; give data_dir a "
                    f"folder outside {root}"
                )


#: A full disk or an exceeded quota while preparing: one message naming data_dir and the file.
_NO_ROOM = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def _no_room(err: OSError) -> str | None:
    """Why ``err`` is a full disk (``datasets`` and Arrow raise some without an errno), else None."""
    if err.errno in _NO_ROOM:
        return _NO_ROOM[err.errno]
    text = str(err).lower()
    return next((why for why in _NO_ROOM.values() if why in text), None)


def _build_staged(
    cfg: PipelineConfig,
    resolved: list[tuple[SourceSettings, Source]],
    fingerprints: list[list[dict]],
    settings: dict,
    digest: str,
    folder: Path,
) -> dict:
    """Prepare into a staging folder beside ``folder`` and swap it in when complete; on any failure the
    staging folder goes and ``folder`` (the earlier splits) stays as it was."""
    staging = staging_dir(folder)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        manifest = build_prepared(cfg, resolved, fingerprints, settings, digest, staging)
        swap_in(staging, folder)
        return manifest
    except OSError as err:
        why = _no_room(err)
        if why is None:
            raise
        written = Path(os.fsdecode(err.filename or err.filename2 or staging))
        what = f"into {written}" if written.is_dir() else str(written)
        kept = f"the earlier splits in {folder} are unchanged" if folder.is_dir() else "nothing was kept"
        raise DataError(
            f"data_dir: {cfg.data.data_dir} ran out of room while preparing {folder.name}: {why} writing "
            f"{what} ({kept}). Free space there, or give data_dir a folder on a disk with room"
        ) from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def row_code_digest() -> str:
    """SHA-256 (12 hex digits) of the code that reads, normalises, filters and splits rows
    (:data:`ROW_CODE_FILES`): prepared data is keyed by it, so a change of that code (a layout that now keeps
    rows an older version dropped) prepares again instead of reusing the older version's splits."""
    import hashlib

    return hashlib.sha256(b"".join(Path(f).read_bytes() for f in ROW_CODE_FILES)).hexdigest()[:12]


def _settings(cfg: PipelineConfig) -> dict:
    """The prepare settings of ``cfg`` (its data settings and objective) and the version of the row code."""
    return {**prepare_settings(cfg.data, cfg.objective.objective), "row_code": row_code_digest()}


#: The modules whose code decides the prepared rows (their bytes are part of the prepared data's key).
ROW_CODE_FILES = tuple(
    m.__file__
    for m in (
        build_module,
        chat_module,
        formats_module,
        jsonscan_module,
        mix_module,
        preference_module,
        sources_module,
    )
)


def _prepare_rank0(cfg: PipelineConfig, folder: Path) -> PreparedData:
    data = cfg.data
    check_data_dir_outside_sources(cfg)
    resolved = _resolve_sources(cfg)
    settings = _settings(cfg)
    digest = settings_hash(settings)
    check_output_folder("data_dir", folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
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
        recover(folder)
        fingerprints = _fingerprints(resolved)
        manifest, why = check_prepared(folder, digest, _flat(fingerprints))
        if manifest is not None:
            log.info("Reusing prepared data in %s (same settings %s, source unchanged)", folder, digest)
            return _result(folder, manifest, reused=True)
        if why:
            log.warning("Preparing again: %s", why)
        names = ", ".join(spec.data.dataset for spec, _ in resolved)
        log.info("Preparing %s into %s", names, folder)
        manifest = _build_staged(cfg, resolved, fingerprints, settings, digest, folder)
        return _result(folder, manifest, reused=False)
    finally:
        lock.release()


def _wait_ready(cfg: PipelineConfig, folder: Path, rank: int) -> PreparedData:
    """Poll for rank 0's marker (no process group); a clear error after ``prepare_timeout_s``."""
    digest = settings_hash(_settings(cfg))
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
    digest = settings_hash(_settings(cfg))
    return f"ftpipe/prepare/{digest}/{folder.name}/{current_launch().restart_count}"


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


#: Rows of each split of a ``prepared_dir`` checked to be prepared rows.
_CHECKED_ROWS = 20


def _check_prepared_rows(path: Path, objective: str = "sft") -> None:
    """The first rows of a ``prepared_dir`` split must be ftpipe's prepared rows (``{"input", "output"}``
    or ``{"messages"[, "tools"]}``; for a preference objective ``{"prompt", "chosen", "rejected"[,
    "tools"]}``; with ``id`` and ``source``), not raw data."""
    pairs = objective in PAIR_OBJECTIVES
    fix = (
        f"prepared_dir must hold the files `ftpipe prepare` writes ({MANIFEST_NAME} beside them); for raw "
        "data, unset prepared_dir and point `dataset` at it instead"
    )
    seen = 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"prepared_dir: {path}: line {lineno}: unparsable JSON ({err.msg}); {fix}"
                ) from err
            if not isinstance(row, dict):
                raise DataError(
                    f"prepared_dir: {path}: line {lineno} is a JSON {type(row).__name__}, not a prepared row; {fix}"
                )
            pair = is_pair_record(row)
            sft = ("input" in row and "output" in row) or "messages" in row
            if pair != pairs and (pair or sft) and not set(row) - PREPARED_KEYS - PAIR_KEYS:
                shape = "a preference pair" if pair else "a prompt/answer record"
                raise DataError(
                    f"prepared_dir: {path}: line {lineno} is {shape}, but objective is {objective!r}; set "
                    f"objective: {'dpo' if pair else 'sft'}, or give prepared_dir a folder prepared for "
                    f"objective {objective!r}"
                )
            other = sorted(set(row) - (PREPARED_KEYS | PAIR_KEYS if pairs else PREPARED_KEYS))
            shaped = pair if pairs else sft
            if other or not shaped:
                has = f"has the keys {sorted(row)}" + (
                    f" ({', '.join(other)} not prepared fields)" if other else ""
                )
                raise DataError(
                    f"prepared_dir: {path}: line {lineno} {has}; a prepared row holds input and output, or "
                    f"messages (with tools), besides id and source: this looks like raw data. {fix}"
                )
            seen += 1
            if seen >= _CHECKED_ROWS:
                return


def _given_prepared(folder: Path, objective: str = "sft") -> PreparedData:
    """``prepared_dir``: the three split files as they are (checked and counted, not rewritten)."""
    missing = [name for name in SPLIT_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"prepared_dir {folder}: {', '.join(missing)} missing; it must hold "
            f"{', '.join(SPLIT_FILES.values())} (as `ftpipe prepare` writes them), or unset prepared_dir "
            "and give the raw data as dataset"
        )
    for name in SPLIT_FILES.values():
        _check_prepared_rows(folder / name, objective)
    counts = {}
    for split, name in SPLIT_FILES.items():
        with open(folder / name, encoding="utf-8") as fh:
            counts[split] = sum(1 for line in fh if line.strip())
    if counts["train"] == 0:
        raise DataError(f"prepared_dir {folder}: {SPLIT_FILES['train']} has no rows")
    return _result(folder, {"counts": counts}, reused=True)


def prepare_data(cfg: PipelineConfig) -> PreparedData:
    """Prepare (or reuse) the data set of ``cfg`` in ``prepared_data_dir(cfg.data, objective)`` on rank 0 (on
    the first process of every node with ``prepare_per_node``), or take ``prepared_dir`` as it is."""

    folder = prepared_data_dir(cfg.data, cfg.objective.objective)
    rank = global_rank()
    if cfg.data.prepared_dir:
        result = _given_prepared(folder, cfg.objective.objective)
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


def prepared_for(cfg: PipelineConfig, prepared: PreparedData | None = None) -> PreparedData:
    """The prepared data of a stage: ``prepared`` when an earlier stage hands it over (``ftpipe run``
    prepares once for all its stages), else ``prepare_data(cfg)`` (a stage run on its own prepares, or
    finds prepared, what it needs). Handed-over data must be ``cfg``'s own prepared folder."""
    if prepared is None:
        return prepare_data(cfg)
    expected = prepared_data_dir(cfg.data, cfg.objective.objective)
    if _resolved(Path(prepared.folder)) != _resolved(expected):
        raise DataError(
            f"the prepared data handed to this stage ({prepared.folder}) is not the data of its configuration "
            f"({expected}); hand over what prepare_data returned for the same configuration, or none (the "
            "stage then prepares its data itself)"
        )
    return prepared
