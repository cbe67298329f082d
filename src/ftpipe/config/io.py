"""Loading, printing and saving the resolved configuration."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

from ftpipe.config.schema import SECTIONS, PipelineConfig

CONFIG_FILENAME = "config.yaml"


def config_to_yaml(cfg: PipelineConfig) -> str:
    """Flat YAML with one commented block per section; loadable again with ``--config``."""
    chunks = []
    for section in SECTIONS:
        values = dataclasses.asdict(getattr(cfg, section))
        if values.get("datasets"):  # entries show only what they set
            values["datasets"] = [{k: v for k, v in e.items() if v is not None} for e in values["datasets"]]
        body = yaml.safe_dump(
            values, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100
        )
        chunks.append(f"# --- {section} ---\n{body}")
    return "".join(chunks)


def save_config(cfg: PipelineConfig, folder: str | os.PathLike, name: str = CONFIG_FILENAME) -> Path:
    """Write the resolved configuration beside an output; the write is atomic."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    tmp = target.with_name(f".{name}.tmp-{os.getpid()}")
    tmp.write_text(config_to_yaml(cfg), encoding="utf-8")
    tmp.replace(target)
    return target


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> PipelineConfig:
    """Configuration from a flat YAML file with flat overrides on top (the programmatic twin of the CLI)."""
    values: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            from ftpipe.config.validate import ConfigError

            raise ConfigError([f"{path}: expected a mapping of field: value, got {type(loaded).__name__}"])
        values.update(loaded)
    values.update(overrides)
    return PipelineConfig.from_flat(values)
