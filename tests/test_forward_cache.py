"""The forward cache: a split's pass written in chunks, so a killed run resumes after its last finished chunk."""

from __future__ import annotations

import numpy as np
import pytest

from orchestration.forward_cache import cache_folder, cached_layer_pass
from raee.tasks import load_split


class CountingBackbone:
    """The real tiny backbone, counting the examples it is asked to run (the cache's only way to skip work)."""

    def __init__(self, backbone) -> None:
        self.backbone, self.examples = backbone, 0

    def __getattr__(self, name: str):
        return getattr(self.backbone, name)

    def layer_pass(self, texts, task, **kwargs):
        self.examples += len(texts)
        return self.backbone.layer_pass(texts, task, **kwargs)


@pytest.fixture(scope="module")
def data(data_dir):
    return load_split("sst2", "train", str(data_dir)).head(7)


def test_a_pass_is_written_in_chunks_and_read_back_without_recomputing(tiny_llama_backbone, data, tmp_path):
    expected = tiny_llama_backbone.layer_pass(data.texts, data.task)
    counting = CountingBackbone(tiny_llama_backbone)
    first = cached_layer_pass(counting, data, tmp_path, quiet=True, chunk_rows=3)
    folder = cache_folder(tmp_path, tiny_llama_backbone, data)
    assert len(list(folder.glob("*-idx.npy"))) == 3  # 3 + 3 + 1 examples
    again = cached_layer_pass(counting, data, tmp_path, quiet=True, chunk_rows=3)
    assert counting.examples == len(data)  # the second pass computed nothing
    for got in (first, again):
        np.testing.assert_allclose(got.probs, expected.probs, atol=1e-5)
        np.testing.assert_allclose(got.states, expected.states, atol=1e-4)


def test_a_run_killed_mid_pass_resumes_after_its_last_finished_chunk(tiny_llama_backbone, data, tmp_path):
    counting = CountingBackbone(tiny_llama_backbone)
    full = cached_layer_pass(counting, data, tmp_path, quiet=True, chunk_rows=3)
    folder = cache_folder(tmp_path, tiny_llama_backbone, data)
    # A kill during the last chunk: its arrays may be written, but a chunk exists only once its index file does.
    last = max(folder.glob("*-idx.npy"), key=lambda p: np.load(p).max())
    last.unlink()
    resumed = CountingBackbone(tiny_llama_backbone)
    got = cached_layer_pass(resumed, data, tmp_path, quiet=True, chunk_rows=3)
    assert resumed.examples == 1  # only the lost chunk's example ran again
    np.testing.assert_allclose(got.probs, full.probs, atol=1e-5)


def test_chunk_rows_below_one_is_refused(tiny_llama_backbone, data, tmp_path):
    with pytest.raises(ValueError, match="chunk_rows"):
        cached_layer_pass(tiny_llama_backbone, data, tmp_path, quiet=True, chunk_rows=0)
