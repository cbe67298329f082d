"""The training dataset: a prepared JSONL split read row by row and tokenized once (``SFTDataset``).

Rows are read line by line (:func:`load_jsonl_rows`), so values keep their types, and encoded with the
pure functions of :mod:`ftpipe.data.tokenize` through ``datasets.map`` (cached on disk by the
tokenizer, the template and the data). The caching and the leader/follower machinery take the batch
encoder, its columns and its code as arguments, so the preference pairs of :mod:`ftpipe.data.pairs`
are tokenized the same way (under cache keys of their own).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from torch.utils.data import Dataset

from ftpipe.config.paths import tokenize_settings
from ftpipe.config.schema import DataConfig
from ftpipe.data import chat as chat_module
from ftpipe.data import render as render_module
from ftpipe.data import tokenize as tokenize_module
from ftpipe.data.chat import uses_tools
from ftpipe.data.errors import DataError
from ftpipe.data.jsonscan import RAW_COLUMN
from ftpipe.data.render import check_tool_template, model_name, require_chat_template
from ftpipe.data.tokenize import (
    IGNORE_INDEX,
    TokenizationStats,
    chat_segments,
    encode_examples,
    eos_id,
    is_chat_row,
    text_ids,
)
from ftpipe.utils.logging import get_logger

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

log = get_logger(__name__)


_EMPTY_SAMPLE = {
    "input_ids": [],
    "labels": [],
    "prompt_truncated": False,
    "output_cut": False,
    "full_length": 0,
    "label_count": 0,
}


def _encode_batch(
    batch: dict[str, list],
    tokenizer: PreTrainedTokenizerBase,
    data_cfg: DataConfig,
    max_len: int,
    **_: Any,
) -> dict[str, list]:
    """Rows -> samples (usually one per row; one per assistant turn for history-rewriting templates; a
    ``dropped`` placeholder for a row with nothing to learn, so every row is counted)."""
    out: dict[str, list] = {name: [] for name in _features()}
    count = len(next(iter(batch.values()))) if batch else 0
    for j in range(count):
        row = json.loads(batch[RAW_COLUMN][j]) if RAW_COLUMN in batch else {c: batch[c][j] for c in batch}
        examples, per_turn = encode_examples(tokenizer, row, data_cfg, max_len)
        items = [
            dataclasses.asdict(e)
            | {"dropped": False, "label_count": sum(1 for label in e.labels if label != IGNORE_INDEX)}
            for e in examples
        ] or [_EMPTY_SAMPLE | {"dropped": True}]
        for turn, item in enumerate(items):
            for key, value in item.items():
                out[key].append(value)
            out["per_turn"].append(per_turn)
            out["turn"].append(turn if per_turn else -1)
            out["row_id"].append(row.get("id") if isinstance(row.get("id"), int) else None)
            out["source"].append(row.get("source") if isinstance(row.get("source"), str) else None)
    return out


def _warn_if_turns_lack_eos(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    probe = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
    try:
        segments = chat_segments(tokenizer, probe, row_name="probe")
    except Exception:  # the rows themselves report template problems, naming the row
        return
    if tokenizer.eos_token_id not in text_ids(tokenizer, segments[-1][0]):
        log.warning(
            "%s: the chat template of %s does not end assistant turns with the EOS token %r; the final "
            "turn of each sample gets EOS appended, earlier turns are trained as the template renders them",
            name,
            model_name(tokenizer),
            tokenizer.eos_token,
        )


def load_jsonl_rows(path: str | os.PathLike, cache_dir: str | None = None) -> datasets.Dataset:
    """A JSONL file as a memory-mapped data set of one column holding each line's JSON text.

    The rows are decoded one by one where they are used, so every value keeps the type its own row
    gives it (``datasets``' JSON loader would give a column one type across all rows, and fill absent
    keys of nested objects, such as tool arguments, with null). The Arrow file is cached under
    ``cache_dir`` (default: the ``datasets`` cache), keyed by the file's path, size and mtime.
    """
    import datasets

    from ftpipe.data.jsonscan import scan_json_lines

    path = Path(path)
    if not path.is_file():
        raise DataError(f"prepared data file {path} does not exist; run the prepare stage first")
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "ftpipe-rows"
    target = folder / f"{path.stem}-{key}.arrow"
    if not target.is_file():
        work = folder / f".{key}-{os.getpid()}"
        try:  # an unreadable line is a BadRowError naming the file and line
            scan = scan_json_lines(path, work, fail=True)
            if scan.arrow_file is None:  # pragma: no cover - scan_json_lines always writes one
                raise FileNotFoundError(path)
            os.replace(scan.arrow_file, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return datasets.Dataset.from_file(str(target))


def _load_rows(source: str | os.PathLike | datasets.Dataset, cache_dir: str | None) -> datasets.Dataset:
    import datasets

    if isinstance(source, datasets.Dataset):
        return source
    return load_jsonl_rows(source, cache_dir)


def _rows_use_tools(
    rows: datasets.Dataset,
    uses: Callable[[Mapping[str, Any]], bool] = uses_tools,
    column: str = "messages",
) -> bool:
    """True when a row has tools, tool calls or tool results (only raw rows that mention ``"tool`` are
    parsed); ``uses`` tells it of one row, ``column`` is the one that holds the turns in a parsed data set."""
    if RAW_COLUMN not in rows.column_names:
        return column in rows.column_names and any(uses(row) for row in rows)
    import pyarrow.compute as pc

    raw = rows.data.column(RAW_COLUMN)
    hits = pc.indices_nonzero(pc.match_substring(raw, '"tool')).to_pylist()
    return any(uses(json.loads(raw[i].as_py())) for i in hits)


def _features() -> datasets.Features:
    from datasets import Features, List, Value

    return Features(
        {
            "input_ids": List(Value("int32")),
            "labels": List(Value("int32")),
            "prompt_truncated": Value("bool"),
            "output_cut": Value("bool"),
            "full_length": Value("int32"),
            # the labelled tokens of the sample: the statistics sum this column instead of reading every
            # label (on a large split that read would map gigabytes of the cache into memory)
            "label_count": Value("int32"),
            "dropped": Value("bool"),
            "per_turn": Value("bool"),
            "turn": Value("int32"),
            "row_id": Value("int64"),
            "source": Value("string"),
        }
    )


def _empty(features: datasets.Features | None = None) -> datasets.Dataset:
    import datasets

    features = _features() if features is None else features
    return datasets.Dataset.from_dict({name: [] for name in features}, features=features)


#: The files whose code decides SFT's encoding (their bytes are part of the cache key).
ENCODING_FILES = (__file__, tokenize_module.__file__, render_module.__file__, chat_module.__file__)


def code_digest(*extra: str | os.PathLike) -> str:
    """SHA-256 of the encoding code: :data:`ENCODING_FILES`, then the ``extra`` files (another encoder's)."""
    return hashlib.sha256(b"".join(Path(f).read_bytes() for f in (*ENCODING_FILES, *extra))).hexdigest()


#: Rows per tokenizing process: below twice this a split is tokenized in one process.
ROWS_PER_PROC = 20_000
DONE_SUFFIX = ".done.json"
FAILED_SUFFIX = ".failed"


def _tokenizer_signature(tokenizer: PreTrainedTokenizerBase) -> str:
    """What of the tokenizer decides the ids: its vocabulary and merges, special tokens, chat template."""
    import tokenizers
    import transformers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [
        transformers.__version__,  # chat templates render through it
        tokenizers.__version__,
        type(tokenizer).__name__,
        tokenizer.name_or_path,
        len(tokenizer),
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        tokenizer.chat_template,
        backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
    ]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def _tokenized_cache(
    rows: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, data_cfg: DataConfig, max_len: int, code: str
) -> Path | None:
    """The cache file of these rows tokenized so (None for rows that are not a file of their own): keyed by
    the rows' file, the tokenizer, the data settings that change tokenized samples (derived from the fields'
    declarations: ``ftpipe.config.paths.tokenize_settings``), the length and the encoding code."""
    files = [f["filename"] for f in rows.cache_files]
    if len(files) != 1:
        return None
    source = Path(files[0])
    settings = json.dumps(tokenize_settings(data_cfg), sort_keys=True, default=str)
    key = hashlib.sha256(
        "|".join([source.name, _tokenizer_signature(tokenizer), settings, str(max_len), code]).encode()
    ).hexdigest()[:20]
    return source.with_name(f"{source.stem}-tokenized-{key}.arrow")


def _tokenize(
    rows: datasets.Dataset,
    fn_kwargs: dict[str, Any],
    name: str,
    cache: Path | None,
    leader: bool,
    *,
    encode: Callable[..., dict[str, list]] | None = None,
    features: datasets.Features | None = None,
) -> datasets.Dataset:
    """``datasets.map`` of the encoding over ``rows`` into ``cache`` (reused when there); a leader
    marks the cache done (or failed) for the processes that wait for it. ``encode`` (a module-level
    batch function, default SFT's ``_encode_batch``) writes the columns of ``features`` (default SFT's)."""
    procs = min(os.cpu_count() or 1, len(rows) // ROWS_PER_PROC)
    done, failed = (
        (Path(f"{cache}{suffix}") for suffix in (DONE_SUFFIX, FAILED_SUFFIX)) if cache else (None, None)
    )
    if leader and failed is not None:
        failed.unlink(missing_ok=True)
    try:
        encoded = rows.map(
            _encode_batch if encode is None else encode,
            batched=True,
            fn_kwargs=fn_kwargs,
            remove_columns=rows.column_names,
            features=_features() if features is None else features,
            desc=f"tokenizing {name}",
            num_proc=procs if procs > 1 else None,
            cache_file_name=str(cache) if cache is not None else None,
        )
    except Exception as err:
        if leader and failed is not None:
            failed.write_text(f"{type(err).__name__}: {err}", encoding="utf-8")
        raise
    if leader and done is not None:
        files = [f["filename"] for f in encoded.cache_files]
        tmp = done.with_name(f".{done.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"files": files}), encoding="utf-8")
        os.replace(tmp, done)
    return encoded


def _wait_for_leader(cache: Path, name: str, wait_s: float) -> datasets.Dataset:
    """The leader's tokenized files, memory-mapped, once it marks them done (no tokenizing here)."""
    import datasets

    done, failed = Path(f"{cache}{DONE_SUFFIX}"), Path(f"{cache}{FAILED_SUFFIX}")
    started = time.time()
    deadline = time.monotonic() + wait_s
    announced = False
    while True:
        if done.is_file():
            try:
                files = json.loads(done.read_text(encoding="utf-8"))["files"]
                parts = [datasets.Dataset.from_file(f) for f in files]
            except (OSError, ValueError, KeyError):
                parts = None  # being rewritten by a new leader: look again
            if parts:
                log.info("%s: read the tokenized split of the first process (%s)", name, cache.name)
                return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        if failed.is_file() and failed.stat().st_mtime >= started - 60:
            raise DataError(f"the process that tokenizes the data failed: {failed.read_text()}")
        if time.monotonic() > deadline:
            raise DataError(
                f"the first process did not finish tokenizing within {wait_s:.0f} s "
                "(prepare_timeout_s); look at its log, or raise prepare_timeout_s"
            )
        if not announced:
            log.info("%s: waiting for the first process to tokenize it (up to %.0f s)", name, wait_s)
            announced = True
        time.sleep(0.5)


def encode_split(
    rows: datasets.Dataset,
    fn_kwargs: dict[str, Any],
    *,
    name: str,
    cache: Path | None,
    role: Literal["alone", "leader", "follower"],
    wait_s: float,
    encode: Callable[..., dict[str, list]] | None = None,
    features: datasets.Features | None = None,
) -> datasets.Dataset:
    """The encoded split: empty, read from the leader's cache (a follower), or tokenized (here, or
    reused from ``cache``); an error about the data is re-raised naming the split."""
    try:
        if len(rows) == 0:
            return _empty(features)
        if role == "follower" and cache is not None:
            return _wait_for_leader(cache, name, wait_s)
        return _tokenize(
            rows, fn_kwargs, name, cache, leader=role == "leader", encode=encode, features=features
        )
    except ValueError as err:  # name the file: the message already names the row
        raise type(err)(f"{name}: {err}") from err


class SFTDataset(Dataset):
    """A prepared split tokenized once at construction (cached on disk; memory-mapped).

    With several processes, one tokenizes and the others read its cache: ``role="leader"`` tokenizes
    (with every core on large splits) and marks the cache done, ``role="follower"`` waits for that mark
    (polling the file system, no collective that could time out; at most ``wait_s`` seconds) and
    memory-maps the leader's files without tokenizing. The cache is keyed by the prepared file, the
    tokenizer (its vocabulary, special tokens and chat template), the data settings, the length and the
    encoding code. ``role="alone"`` (one process) tokenizes, or reuses the same cache.

    Items are ``{"input_ids": list[int], "labels": list[int]}``, unpadded; ``stats`` says how many rows
    were truncated, cut, dropped or split into one sample per assistant turn. ``samples`` holds every
    sample with its row id, source and token counts (what ``ftpipe inspect`` shows).
    """

    def __init__(
        self,
        source: str | os.PathLike | datasets.Dataset,
        tokenizer: PreTrainedTokenizerBase,
        data_cfg: DataConfig,
        *,
        name: str | None = None,
        max_len: int | None = None,
        cache_dir: str | None = None,
        role: Literal["alone", "leader", "follower"] = "alone",
        wait_s: float = 3600.0,
    ) -> None:
        import pyarrow.compute as pc

        self.name = name or (Path(source).name if isinstance(source, (str, os.PathLike)) else "dataset")
        self.max_len = data_cfg.max_seq_length if max_len is None else max_len
        try:
            rows = _load_rows(source, cache_dir)
        except ValueError as err:
            raise type(err)(f"{self.name}: {err}") from err
        # Fail before any long work: a missing chat template or EOS shows on the first row already.
        eos_id(tokenizer)
        chat_rows = "messages" in rows.column_names or (
            len(rows) > 0 and RAW_COLUMN in rows.column_names and is_chat_row(json.loads(rows[0][RAW_COLUMN]))
        )
        if chat_rows or data_cfg.use_chat_template:
            reason = "the data has chat rows (messages)" if chat_rows else "use_chat_template is true"
            require_chat_template(tokenizer, reason)
            _warn_if_turns_lack_eos(tokenizer, self.name)
        if chat_rows and _rows_use_tools(rows):
            check_tool_template(tokenizer, f"{self.name}: the data uses tools")
        code = code_digest()  # what encodes
        fn_kwargs = {"tokenizer": tokenizer, "data_cfg": data_cfg, "max_len": self.max_len, "code": code}
        cache = _tokenized_cache(rows, tokenizer, data_cfg, self.max_len, code)
        encoded = encode_split(rows, fn_kwargs, name=self.name, cache=cache, role=role, wait_s=wait_s)
        table = encoded.data
        dropped = table.column("dropped").to_pylist()
        kept = [i for i, d in enumerate(dropped) if not d]
        # the kept samples' lengths, from the offsets (select() below maps indices: the table stays whole)
        self._lengths = pc.filter(
            pc.list_value_length(table.column("input_ids")), pc.invert(table.column("dropped"))
        )
        if len(kept) < len(dropped):
            encoded = encoded.select(kept)
            table = encoded.data
        per_turn = table.column("per_turn")
        first_turns = pc.and_(per_turn, pc.equal(table.column("turn"), 0))
        lengths = pc.list_value_length(table.column("input_ids"))  # reads the offsets only
        self.stats = TokenizationStats(
            rows=int(len(dropped) - (pc.sum(per_turn).as_py() or 0) + (pc.sum(first_turns).as_py() or 0)),
            kept=len(kept),
            truncated_prompts=int(pc.sum(table.column("prompt_truncated")).as_py() or 0),
            cut_outputs=int(pc.sum(table.column("output_cut")).as_py() or 0),
            dropped=len(dropped) - len(kept),
            tokens=int(pc.sum(lengths).as_py() or 0),
            label_tokens=int(pc.sum(table.column("label_count")).as_py() or 0),
            per_turn_rows=int(pc.sum(first_turns).as_py() or 0),
            per_turn_samples=int(pc.sum(per_turn).as_py() or 0),
        )
        self.samples = encoded
        self.data = encoded.select_columns(["input_ids", "labels"])
        self._log_stats()

    def _log_stats(self) -> None:
        s = self.stats
        level = "warning" if s.cut_outputs or s.dropped else "info"
        getattr(log, level)(
            "%s: %d rows -> %d samples, %d tokens (%d in the loss); max_seq_length %d: %d prompts truncated "
            "from the left, %d answers cut from the right, %d rows dropped with nothing to learn",
            self.name,
            s.rows,
            s.kept,
            s.tokens,
            s.label_tokens,
            self.max_len,
            s.truncated_prompts,
            s.cut_outputs,
            s.dropped,
        )
        if s.per_turn_rows:
            log.info(
                "%s: the chat template renders earlier turns differently once later turns exist (it rewrites "
                "the history, e.g. strips reasoning from earlier assistant turns), so %d conversations were "
                "trained as %d samples, one per assistant turn, each with its history as the template "
                "renders it at inference",
                self.name,
                s.per_turn_rows,
                s.per_turn_samples,
            )

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.data[index]

    @property
    def lengths(self) -> list[int]:
        """Tokens of every sample, in order (read from the Arrow table, no sample is decoded)."""
        return self._lengths.to_pylist()
