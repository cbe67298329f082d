"""The cache keys are derived from what every configuration field declares it changes: a field that
declares nothing fails here, and changing any field moves exactly the keys its declaration names."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest

from ftpipe.config.paths import (
    PATH_FIELDS,
    PREPARE_FIELDS,
    prepare_settings,
    prepared_data_dir,
    settings_hash,
    tokenize_settings,
)
from ftpipe.config.schema import (
    CACHE_METADATA,
    NEITHER,
    PREPARED,
    TOKENIZED,
    TOKENIZER,
    DataConfig,
    DatasetEntry,
    ObjectiveConfig,
    PipelineConfig,
    affects,
    cache_effect,
    fields_affecting,
)

pytestmark = pytest.mark.timeout(60)

EFFECTS = (PREPARED, TOKENIZED, TOKENIZER, NEITHER)
#: (section class, field) of every configuration field.
ALL_FIELDS = [
    (type(getattr(PipelineConfig(), section.name)), f)
    for section in dataclasses.fields(PipelineConfig)
    for f in dataclasses.fields(getattr(PipelineConfig(), section.name))
]
#: Where the location of the prepared data changes, but not what is prepared.
LOCATION_FIELDS = ("data_dir", "prepared_dir")


def test_every_configuration_field_declares_what_it_changes():
    undeclared = [
        f"{cls.__name__}.{f.name}" for cls, f in ALL_FIELDS if f.metadata.get(CACHE_METADATA) not in EFFECTS
    ]
    assert not undeclared, (
        f"these fields declare no cache effect: {undeclared}; give each metadata=affects(PREPARED | "
        "TOKENIZED | TOKENIZER | NEITHER) (ftpipe/config/schema.py)"
    )
    assert len(ALL_FIELDS) > 100  # the walk saw every section


def test_a_field_without_a_declaration_is_an_error_where_the_keys_are_derived():
    @dataclasses.dataclass(kw_only=True)
    class Section:
        declared: int = dataclasses.field(default=1, metadata=affects(PREPARED))
        forgotten: int = 2

    with pytest.raises(TypeError, match=r"Section\.forgotten declares no cache effect: .*affects\("):
        fields_affecting(Section, PREPARED)
    assert cache_effect(Section, "declared") == PREPARED
    with pytest.raises(ValueError, match="unknown cache effect 'prepare'"):
        affects("prepare")  # type: ignore[arg-type]


def test_the_derived_prepare_fields_are_those_that_were_listed_by_hand():
    """SFT folders and manifests keep their hashes: the same fields, in the same order, as before."""
    assert PREPARE_FIELDS == (
        "dataset_split",
        "data_format",
        "converter",
        "allow_empty_prompt",
        "input_template",
        "input_template_no_input",
        "output_template",
        "field_mapping",
        "optional_fields",
        "split_seed",
        "max_samples",
        "on_bad_row",
        "text_replacements",
        "datasets",
    )
    assert set(PATH_FIELDS) <= set(fields_affecting(DataConfig, PREPARED))
    data = DataConfig(data_dir="/d")
    base = Path("/d/cognitivecomputations/dolphin/flan1m-alpaca-uncensored/train=90%-val=5%-test=5%")
    assert prepared_data_dir(data) == base and settings_hash(prepare_settings(data)) == "082c6b758c"
    reseeded = dataclasses.replace(data, split_seed=7)
    assert prepared_data_dir(reseeded) == base.with_name(base.name + "-cfg8a66a38f")
    assert settings_hash(prepare_settings(reseeded)) == "fb45270170"
    assert prepared_data_dir(data, "dpo") == base.with_name(base.name + "-cfgb6b3f28b")


def test_only_the_data_section_and_the_objective_change_cached_data_by_value():
    """The keys see the data section and ``objective`` (the tokenizer's fields through the tokenizer): a field
    of another section declared PREPARED or TOKENIZED would not reach them."""
    elsewhere = {
        f"{cls.__name__}.{f.name}"
        for cls, f in ALL_FIELDS
        if cls is not DataConfig and f.metadata[CACHE_METADATA] in (PREPARED, TOKENIZED)
    }
    assert elsewhere == {"ObjectiveConfig.objective"}
    assert fields_affecting(ObjectiveConfig, PREPARED) == ("objective",)


def _other(hint: Any, value: Any) -> Any:
    """A valid value of type ``hint`` that differs from ``value``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        options = [a for a in args if a is not type(None)]
        if value is None:
            return _other(options[0], None)
        for option in options:  # another member of the union first (``bool | Literal["auto"]``: True)
            candidate = _other(option, value)
            if candidate != value:
                return candidate
        raise AssertionError(hint)
    if origin is Literal:
        return next(a for a in args if a != value)
    if hint is bool:
        return not value if isinstance(value, bool) else True
    if hint is int:
        return (value or 0) + 1 if isinstance(value, int) else 1
    if hint is float:
        return (value or 0.0) / 2 + 0.125 if isinstance(value, float) else 0.5
    if hint is str:
        return f"{value}-other" if isinstance(value, str) else "other"
    if origin is list:
        if args[0] is DatasetEntry:
            return [DatasetEntry(dataset="org/other"), DatasetEntry(dataset="org/more")]
        item = _other(args[0], value[-1] if value else None)
        return [*(value or []), item]
    if origin is dict:
        return {**(value or {}), "other": "value"}
    raise AssertionError(f"no alternative value for {hint}")


def _keys(cfg: PipelineConfig) -> tuple[dict, Path, dict]:
    """(the prepare settings, the prepared folder relative to data_dir, the tokenize settings)."""
    folder = prepared_data_dir(cfg.data, cfg.objective.objective)
    if not cfg.data.prepared_dir:
        folder = folder.relative_to(Path(cfg.data.data_dir).expanduser())
    return prepare_settings(cfg.data, cfg.objective.objective), folder, tokenize_settings(cfg.data)


@pytest.mark.parametrize(
    ("section", "field"), ALL_FIELDS, ids=[f"{c.__name__}.{f.name}" for c, f in ALL_FIELDS]
)
def test_changing_a_field_moves_exactly_the_keys_it_declares(section: type, field: dataclasses.Field):
    base = PipelineConfig()
    value = base.to_flat()[field.name]
    changed = base.replace(**{field.name: _other(typing.get_type_hints(section)[field.name], value)})
    assert changed.to_flat()[field.name] != value
    (settings, folder, tokens), (settings2, folder2, tokens2) = _keys(base), _keys(changed)
    effect = cache_effect(section, field.name)
    if effect == PREPARED:  # the prepared rows: their folder, their manifest and the tokenized samples
        assert settings2 != settings and settings_hash(settings2) != settings_hash(settings)
        assert folder2 != folder
        assert tokens2 != tokens or section is not DataConfig  # the objective: another folder, other files
    elif effect == TOKENIZED:
        assert (settings2, folder2) == (settings, folder) and tokens2 != tokens
    else:  # TOKENIZER (covered by the tokenizer's signature, tests/data/test_tokenize_cache.py) or NEITHER
        assert (settings2, tokens2) == (settings, tokens)
        assert folder2 == folder or field.name in LOCATION_FIELDS
