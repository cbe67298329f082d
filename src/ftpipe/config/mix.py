"""The data sources of a configuration: the one ``dataset``, or each entry of the ``datasets`` mix with
the top-level data settings under its own."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ftpipe.config.paths import looks_local
from ftpipe.config.schema import MIX_ONLY_FIELDS, DataConfig, DatasetEntry


@dataclass(frozen=True)
class SourceSettings:
    """One source: its name, the data settings it is prepared with, and its share of the mix."""

    name: str
    data: DataConfig
    weight: float | None = None
    num_samples: int | None = None
    #: ``datasets[i]`` for an entry of the mix, ``dataset`` for the one-dataset shortcut.
    origin: str = "dataset"


def default_source_name(dataset: str) -> str:
    """``tool_calls`` for ``data/tool_calls.jsonl``, ``org/name`` for a hub id."""
    given = dataset.strip()
    if looks_local(given):
        first = Path(given.split(",")[0].strip().rstrip("/")).expanduser()
        stem = first.stem if first.suffix else first.name
        return stem.replace("*", "").replace("?", "") or "data"
    return given


def source_settings(data: DataConfig) -> list[SourceSettings]:
    """The sources of ``data`` in order; names are unique (``-2``, ``-3`` appended to repeats)."""
    if not data.datasets:
        return [SourceSettings(name=default_source_name(data.dataset), data=data)]
    sources, seen = [], set()
    for i, entry in enumerate(data.datasets):
        own = {
            f.name: getattr(entry, f.name)
            for f in dataclasses.fields(DatasetEntry)
            if f.name not in MIX_ONLY_FIELDS and getattr(entry, f.name) is not None
        }
        settings = dataclasses.replace(data, **own, datasets=None)
        name = entry.name or default_source_name(entry.dataset)
        base, n = name, 2
        while name in seen and not entry.name:
            name, n = f"{base}-{n}", n + 1
        seen.add(name)
        sources.append(
            SourceSettings(
                name=name,
                data=settings,
                weight=entry.weight,
                num_samples=entry.num_samples,
                origin=f"datasets[{i}]",
            )
        )
    return sources
