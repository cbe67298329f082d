"""The cached DPO reference log-probabilities are keyed by the tokenized samples too: a changed system
prompt, chat template or tokenizer (a new tokenization cache file) computes them again."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ftpipe.config import PipelineConfig
from ftpipe.train.reference import cache_key


class _Pairs(list):
    def __init__(self, cache_file, count=3, fingerprint="f0"):
        super().__init__(range(count))
        self.data = SimpleNamespace(
            cache_files=[{"filename": f"/cache/{cache_file}"}] if cache_file else [], _fingerprint=fingerprint
        )


@pytest.mark.timeout(30)
def test_reference_key_follows_the_tokenized_samples(tmp_path):
    split = tmp_path / "training.jsonl"
    split.write_text("{}\n")
    cfg = PipelineConfig.from_flat({"objective": "dpo"})
    same = cache_key(cfg, split, _Pairs("tok-abc.arrow"))
    assert cache_key(cfg, split, _Pairs("tok-abc.arrow")) == same
    assert (
        cache_key(cfg, split, _Pairs("tok-def.arrow")) != same
    )  # re-tokenized (template, prompt, tokenizer)
    assert cache_key(cfg, split, _Pairs("tok-abc.arrow", count=2)) != same  # another set of kept pairs
    in_memory = cache_key(cfg, split, _Pairs(None, fingerprint="a"))
    assert cache_key(cfg, split, _Pairs(None, fingerprint="b")) != in_memory
