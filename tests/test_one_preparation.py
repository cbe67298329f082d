"""One preparation per run: a stage handed the prepared data uses it; on its own it prepares once.

(``ftpipe run`` end to end counts its preparations in tests/test_preference_run.py.)
"""

from __future__ import annotations

import pytest

from ftpipe.config import PipelineConfig


def _cfg(tmp_path, alpaca_demo) -> PipelineConfig:
    return PipelineConfig.from_flat(
        {
            "hf_model_id": "embedded",
            "dataset": str(alpaca_demo),
            "dataset_subset": None,
            "data_dir": str(tmp_path / "data"),
            "max_samples": 40,
            "max_seq_length": 64,
            "micro_batch_size": 2,
            "num_workers": 0,
        }
    )


@pytest.fixture
def preparations(monkeypatch) -> list[PipelineConfig]:
    """Every call of ``prepare_data`` (which still runs)."""
    from ftpipe.data import prepare

    calls: list[PipelineConfig] = []
    real = prepare.prepare_data
    monkeypatch.setattr(prepare, "prepare_data", lambda cfg: calls.append(cfg) or real(cfg))
    return calls


@pytest.mark.timeout(120)
def test_stages_take_the_prepared_data_they_are_handed(tmp_path, alpaca_demo, tokenizer, preparations):
    from ftpipe.data.datamodule import SFTDataModule
    from ftpipe.data.errors import DataError
    from ftpipe.data.prepare import prepared_for
    from ftpipe.train.run import _prepare_inputs

    cfg = _cfg(tmp_path, alpaca_demo)
    prepared = prepared_for(cfg)  # not handed any: prepares
    assert len(preparations) == 1 and prepared.counts["train"] > 0
    assert prepared_for(cfg, prepared) is prepared
    assert _prepare_inputs(cfg, prepared)[1] is prepared  # the training stage
    module = SFTDataModule(cfg, tokenizer, prepared=prepared)
    module.setup("fit")
    assert len(module.train_dataset) > 0 and module.prepared is prepared
    assert len(preparations) == 1

    with pytest.raises(DataError, match="is not the data of its configuration"):
        prepared_for(cfg.replace(max_samples=30), prepared)  # another configuration's folder


@pytest.mark.timeout(120)
def test_a_stage_on_its_own_prepares_once(tmp_path, alpaca_demo, tokenizer, preparations):
    from ftpipe.data.datamodule import SFTDataModule
    from ftpipe.train.run import _prepare_inputs

    cfg = _cfg(tmp_path, alpaca_demo)
    _, prepared = _prepare_inputs(cfg)  # ``ftpipe train``: prepares, then hands it to its data module
    assert len(preparations) == 1
    module = SFTDataModule(cfg, tokenizer)  # a data module built on its own prepares in setup
    module.setup("fit")
    assert len(preparations) == 2 and module.prepared.folder == prepared.folder
