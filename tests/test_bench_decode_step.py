"""The decode-step A/B benchmark runs every variant on the same batch and they decode the same tokens."""

from __future__ import annotations

import pytest

from dynserve.bench import decode_step


def test_decode_step_variants_agree(checkpoint_factory, capsys):
    path = checkpoint_factory("mixtral")
    res = decode_step.main(
        ["--model", str(path), "--variants", "torch", "cpu", "cpu-no-hugepages", "cpu-unfused", "--num-prompts", "5",
         "--steps", "3",
         "--min-prompt-len", "3", "--max-prompt-len", "20"]
    )  # fmt: skip
    assert set(res["variants"]) == {"torch", "cpu", "cpu-no-hugepages", "cpu-unfused"}
    assert all(v["median_ms"] > 0 and v["best_ms"] <= v["median_ms"] for v in res["variants"].values())
    assert res["variants"]["torch"]["x_first"] == 1.0
    assert res["same_tokens"]
    assert "greedy tokens identical across variants: True" in capsys.readouterr().out
    # the phase breakdown: every variant's phases add up to its step time, kernels and Python apart
    for name, ph in res["phases"].items():
        parts = sum(v for k, v in ph.items() if k != "step")
        assert parts == pytest.approx(ph["step"], rel=1e-6)
        assert ph["forward Python"] > 0 and ph["LM head"] > 0
        assert (ph["forward kernels"] > 0) == (name != "torch")
