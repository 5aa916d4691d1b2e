"""Huge-page backed CPU tensors: same values and shapes, 2 MB-aligned, tied weights stay tied."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from dynserve.model import hugepages

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_HUGEPAGE) is Linux-only")


@linux
def test_empty_is_aligned_and_usable():
    t = hugepages.zeros((3, 1024, 1024), torch.float32)  # 12 MB
    assert t.shape == (3, 1024, 1024) and t.dtype == torch.float32 and t.is_contiguous()
    assert t.data_ptr() % (2 * 1024 * 1024) == 0
    assert not t.any()
    t[1, 5, 7] = 3.0
    assert t.sum().item() == 3.0
    small = hugepages.empty((10,), torch.bfloat16)  # below 2 MB: an ordinary tensor
    assert small.shape == (10,) and small.dtype == torch.bfloat16


def test_disabled_by_env(monkeypatch):
    monkeypatch.setenv("DYNSERVE_HUGEPAGES", "0")
    module = nn.Linear(1024, 1024)
    before = module.weight.data_ptr()
    assert hugepages.move_parameters(module) == 0
    assert module.weight.data_ptr() == before


@linux
def test_move_parameters_keeps_values_and_ties(monkeypatch):
    monkeypatch.delenv("DYNSERVE_HUGEPAGES", raising=False)
    torch.manual_seed(0)
    emb = nn.Embedding(1000, 1024)
    head = nn.Linear(1024, 1000, bias=False)
    head.weight = emb.weight  # tied, like tie_word_embeddings
    small = nn.Linear(4, 4)
    model = nn.ModuleDict({"emb": emb, "head": head, "small": small})
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    small_ptr = small.weight.data_ptr()
    moved = hugepages.move_parameters(model)
    assert moved == 1000 * 1024 * 4  # the tied matrix once; the small linear stays put
    assert head.weight is emb.weight and emb.weight.data_ptr() % (2 * 1024 * 1024) == 0
    assert small.weight.data_ptr() == small_ptr
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k
