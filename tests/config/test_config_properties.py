"""Property tests of configuration parsing: any mapping of known fields, with values of any type, from
Python or from YAML, either validates or is refused with one message per bad field; nothing else is
ever raised."""

from __future__ import annotations

import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftpipe.config import ConfigError, PipelineConfig, validate_config
from ftpipe.config.io import read_config_file
from ftpipe.config.schema import field_section_map

FIELDS = sorted(field_section_map())
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["auto", "fsdp2", "lora", "train", "embedded", "0", "yes", "{instruction}", "a:b", ""]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
mappings = st.dictionaries(st.sampled_from(FIELDS), values, max_size=6)


def _field_of(problem: str) -> str:
    """The field a problem line names: ``name: ...``, ``name[...]...`` or ``a/b/c: ...``."""
    head = problem.split(":", 1)[0]
    return head.split("[", 1)[0].split(".", 1)[0].split(" /", 1)[0].split("/", 1)[0].strip()


def check(flat: dict) -> None:
    try:
        validate_config(PipelineConfig.from_flat(flat))
    except ConfigError as err:
        assert err.problems
        for problem in err.problems:
            assert _field_of(problem) in FIELDS, problem


@SETTINGS
@given(flat=mappings)
def test_any_mapping_validates_or_names_each_bad_field(flat):
    check(flat)


@SETTINGS
@given(flat=mappings)
def test_any_yaml_file_reads_back_or_is_refused(flat, tmp_path_factory):
    try:
        text = yaml.safe_dump(flat, allow_unicode=True)
    except yaml.YAMLError:  # pragma: no cover - safe_dump takes every value drawn here
        return
    path = tmp_path_factory.mktemp("yaml") / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        loaded = read_config_file(path)
    except ConfigError:
        return
    check(loaded)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused_in_every_float_field(value):
    from ftpipe.config.types import field_types

    floats = [name for name, hint in field_types().items() if "float" in str(hint)]
    assert len(floats) > 15
    with pytest.raises(ConfigError) as err:
        validate_config(PipelineConfig.from_flat(dict.fromkeys(floats, value)))
    named = {_field_of(p) for p in err.value.problems}
    assert set(floats) <= named
