"""Several data sets mixed: shares by weight and by num_samples in every split, seeded, per-source counts."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from ftpipe.config import ConfigError, PipelineConfig, validate_config
from ftpipe.config.paths import prepared_data_dir
from ftpipe.data.mix import allocate_splits, apportion, mix_targets, select_source_rows, split_counts
from ftpipe.data.prepare import prepare_data, read_jsonl

pytestmark = pytest.mark.timeout(120)
SPLITS = ("train", "validation", "test")


def test_apportion_and_targets():
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]
    assert apportion(7, [0, 5]) == [0, 7]
    # weights 3:1 over 1000 and 500 rows: A limits the mix (1000 = 75% of 1333)
    assert mix_targets([1000, 500], [3, 1], [None, None]) == [1000, 333]
    assert mix_targets([100, 500], [1, 1], [None, None]) == [100, 100]
    assert mix_targets([1000, 500], [None, None], [300, 800]) == [300, 800]
    assert mix_targets([1000, 500], [None, 2.0], [50, None]) == [50, 500]  # one weighted source: all of it
    assert mix_targets([1000, 500], [None, None], [None, None], max_samples=300) == [200, 100]


def test_split_allocation_keeps_each_share_and_the_plain_split_for_one_source():
    assert allocate_splits([999], (0.9, 0.05, 0.05)) == [split_counts(999, 0.9, 0.05, 0.05)]
    alloc = allocate_splits([300, 800], (0.8, 0.1, 0.1))
    totals = split_counts(1100, 0.8, 0.1, 0.1)
    for split in SPLITS:
        assert sum(a[split] for a in alloc) == totals[split]
        assert abs(alloc[0][split] - totals[split] * 300 / 1100) <= 1
    assert [sum(a.values()) for a in alloc] == [300, 800]


def test_rows_repeat_only_within_a_split():
    counts = {"train": 640, "validation": 80, "test": 80}
    chosen, repeated = select_source_rows(500, counts, seed=7, source_index=1)
    assert repeated and {k: len(v) for k, v in chosen.items()} == counts
    sets = {k: set(v.tolist()) for k, v in chosen.items()}
    assert not (sets["train"] & sets["validation"]) and not (sets["train"] & sets["test"])
    assert not (sets["validation"] & sets["test"])
    assert len(sets["train"] | sets["validation"] | sets["test"]) == 500  # every row used
    again, _ = select_source_rows(500, counts, seed=7, source_index=1)
    assert all((again[k] == chosen[k]).all() for k in counts)


def write_alpaca(path: Path, n: int, tag: str) -> Path:
    rows = [
        {"instruction": f"{tag} question {i}", "input": "", "output": f"{tag} answer {i}"} for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_chat(path: Path, n: int) -> Path:
    rows = [
        {"conversations": [{"from": "human", "value": f"chat {i}"}, {"from": "gpt", "value": f"reply {i}"}]}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def mixed(tmp_path: Path, entries: list[dict], **flat) -> PipelineConfig:
    return validate_config(
        PipelineConfig.from_flat(
            {
                "datasets": entries,
                "data_dir": str(tmp_path / "out"),
                "train_ratio": 0.8,
                "val_ratio": 0.1,
                "test_ratio": 0.1,
                **flat,
            }
        )
    )


def split_sources(result) -> dict[str, Counter]:
    files = {"train": result.train_file, "validation": result.val_file, "test": result.test_file}
    return {name: Counter(r["source"] for r in read_jsonl(path)) for name, path in files.items()}


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ([{"weight": 3}, {"weight": 1}], {"alpha": 1000, "beta": 333}),
        ([{"num_samples": 300}, {"num_samples": 800}], {"alpha": 300, "beta": 800}),
    ],
    ids=["weight", "num_samples"],
)
def test_mix_gives_the_requested_shares_in_every_split(tmp_path, entries, expected):
    a = write_alpaca(tmp_path / "alpha.jsonl", 1000, "alpha")
    b = write_chat(tmp_path / "beta.jsonl", 500)
    cfg = mixed(tmp_path, [{"dataset": str(a), **entries[0]}, {"dataset": str(b), **entries[1]}])
    result = prepare_data(cfg)
    per_split = split_sources(result)
    total = sum(expected.values())
    for split, counts in per_split.items():
        size = sum(counts.values())
        assert size == result.counts[split]
        for name, target in expected.items():
            assert abs(counts[name] - size * target / total) <= 1, (split, counts)
    manifest = json.loads((result.folder / "manifest.json").read_text())
    for name, target in expected.items():
        entry = manifest["sources"][name]
        assert entry["rows_selected"] == target
        assert entry["counts"] == {split: per_split[split][name] for split in SPLITS}
        assert entry["rows_read"] == entry["rows_usable"] == (1000 if name == "alpha" else 500)
    assert manifest["sources"]["beta"]["formats"] == {str(b): "sharegpt"}
    # no row of a source is in two splits, even when rows repeat
    ids = {
        split: {r["id"] for r in read_jsonl(f)}
        for split, f in zip(SPLITS, (result.train_file, result.val_file, result.test_file), strict=True)
    }
    assert not (ids["train"] & ids["test"]) and not (ids["train"] & ids["validation"])
    # seeded: preparing again into another folder writes the same files
    again = prepare_data(cfg.replace(data_dir=str(tmp_path / "again")))
    assert again.train_file.read_bytes() == result.train_file.read_bytes()
    assert again.test_file.read_bytes() == result.test_file.read_bytes()


def test_changed_mix_prepares_into_its_own_folder(tmp_path):
    a = write_alpaca(tmp_path / "alpha.jsonl", 10, "alpha")
    b = write_alpaca(tmp_path / "beta.jsonl", 10, "beta")
    one = mixed(tmp_path, [{"dataset": str(a), "weight": 1}, {"dataset": str(b), "weight": 1}])
    two = mixed(tmp_path, [{"dataset": str(a), "weight": 2}, {"dataset": str(b), "weight": 1}])
    assert prepared_data_dir(one.data) != prepared_data_dir(two.data)
    assert prepared_data_dir(one.data).parent.parent.name.startswith("alpha+1-more-")


def test_each_entry_has_its_own_format_settings_and_names(tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"q": f"q{i}", "a": f"a{i}"}) + "\n" for i in range(6)))
    a = write_alpaca(tmp_path / "alpha.jsonl", 6, "alpha")
    cfg = mixed(
        tmp_path,
        [
            {"dataset": str(a)},
            {
                "dataset": str(qa),
                "name": "quiz",
                "input_template": "Q: {question}",
                "input_template_no_input": None,
                "output_template": "{answer}",
                "field_mapping": {"question": "q", "answer": "a"},
                "optional_fields": [],
            },
        ],
        train_ratio=1.0,
        val_ratio=0.0,
        test_ratio=0.0,
    )
    rows = read_jsonl(prepare_data(cfg).train_file)
    assert Counter(r["source"] for r in rows) == {"alpha": 6, "quiz": 6}
    assert {
        "id": 8,
        "source": "quiz",
        "input": "Q: q2",
        "output": "a2",
    } in rows  # ids continue across sources


def test_mix_configuration_errors_name_the_entry(tmp_path):
    with pytest.raises(ConfigError) as err:
        validate_config(
            PipelineConfig.from_flat(
                {
                    "datasets": [
                        {"dataset": "a.jsonl", "weight": 1, "num_samples": 5},
                        {"dataset": "", "weight": -1, "input_template": "{nope}"},
                        {"dataset": "b.jsonl", "num_samples": 0},
                    ]
                }
            )
        )
    text = str(err.value)
    for expected in (
        "datasets[0].weight / num_samples: give one of them, not both",
        "datasets[1].dataset: empty",
        "datasets[1].weight: -1 is not allowed",
        "datasets[1].input_template: unknown template field {nope}",
        "datasets[2].num_samples: 0 is not allowed",
    ):
        assert expected in text
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.colour: unknown field"):
        PipelineConfig.from_flat({"datasets": [{"dataset": "a.jsonl", "colour": "red"}]})
    with pytest.raises(ConfigError, match=r"datasets\[0\]: a str; each entry is a mapping"):
        PipelineConfig.from_flat({"datasets": ["a.jsonl"]})


def test_missing_source_of_a_mix_names_the_entry(tmp_path):
    a = write_alpaca(tmp_path / "alpha.jsonl", 5, "alpha")
    cfg = mixed(tmp_path, [{"dataset": str(a)}, {"dataset": str(tmp_path / "gone.jsonl")}])
    from ftpipe.data.errors import DataError

    with pytest.raises(DataError, match=r"datasets\[1\] \(gone\): dataset: .*gone\.jsonl' does not exist"):
        prepare_data(cfg)


def test_cli_accepts_a_mix_from_yaml(tmp_path):
    from ftpipe.cli.main import parse

    a = write_alpaca(tmp_path / "alpha.jsonl", 5, "alpha")
    b = write_alpaca(tmp_path / "beta.jsonl", 5, "beta")
    config = tmp_path / "mix.yaml"
    config.write_text(
        f"datasets:\n  - dataset: {a}\n    weight: 2\n  - dataset: {b}\n    num_samples: 3\n    name: b\n"
    )
    _, cfg = parse(["prepare", "--config", str(config), "--data_dir", str(tmp_path / "out")])
    assert [(e.dataset, e.weight, e.num_samples, e.name) for e in cfg.data.datasets] == [
        (str(a), 2.0, None, None),
        (str(b), None, 3, "b"),
    ]
    assert cfg.replace(max_steps=3).data.datasets == cfg.data.datasets  # survives the flat round trip
