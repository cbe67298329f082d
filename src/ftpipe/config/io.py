"""Loading, printing and saving the resolved configuration."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

from ftpipe.config.schema import SECTIONS, PipelineConfig
from ftpipe.config.types import given_forms

CONFIG_FILENAME = "config.yaml"


def config_to_yaml(cfg: PipelineConfig) -> str:
    """Flat YAML with one commented block per section; loadable again with ``--config``."""
    chunks = []
    for section in SECTIONS:
        values = dataclasses.asdict(getattr(cfg, section))
        if section == "debug" and getattr(cfg, section) == SECTIONS[section]():
            continue  # fault injection shows only when something is injected
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


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML would keep the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:  # ``<<: *anchor``: defaults that the mapping's own keys override
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, list | dict):
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be plain text", key_node.start_mark
                )
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"{key!r} is given twice (lines {seen[key]} and {line}); a configuration must mean one "
                    "thing: keep one of them",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The flat mapping of a YAML configuration file; a ConfigError naming the file and line when it is
    missing, not UTF-8 text, not valid YAML, empty, not a mapping, or gives a key twice.

    Merge keys (``<<: *anchor``) are YAML's own; a number field given text that reads as a number (YAML
    1.1 reads ``1e-4`` as text) gets the number, as its flag would; a list field given one plain value
    gets the list of that value (``lora_target_modules: all-linear``), as its flag would.
    """
    from ftpipe.config.validate import ConfigError

    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ConfigError([f"--config: {path} {what}; give a YAML file of flat field: value pairs"])
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(
            [f"--config: {path} is not UTF-8 text (byte {err.start}); save it as UTF-8"]
        ) from None
    except OSError as err:
        raise ConfigError([f"--config: {path} cannot be read ({err.strerror})"]) from None
    try:
        loaded = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "?"
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        what = "" if isinstance(err, yaml.constructor.ConstructorError) else "not valid YAML: "
        raise ConfigError([f"--config: {path}: {where}: {what}{problem}"]) from None
    if loaded is None:
        raise ConfigError(
            [
                f"--config: {path} is empty (or holds only comments); write field: value pairs into it, "
                "or leave out --config"
            ]
        )
    if not isinstance(loaded, dict):
        raise ConfigError(
            [f"--config: {path}: expected a mapping of field: value, got {type(loaded).__name__}"]
        )
    bad_keys = [k for k in loaded if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError([f"--config: {path}: key {k!r} is not a field name" for k in bad_keys])
    return given_forms(loaded)


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> PipelineConfig:
    """Configuration from a flat YAML file with flat overrides on top (the programmatic twin of the CLI)."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(read_config_file(path))
    values.update(overrides)
    return PipelineConfig.from_flat(values)
