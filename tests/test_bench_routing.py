"""`python -m dynserve.bench.routing`: every requested policy gets a row with its measured experts."""

from __future__ import annotations

from dynserve.bench import routing


def test_bench_rows_for_top_p_relative_and_entropy(checkpoint_factory):
    path = checkpoint_factory("mixtral", seed=3, num_local_experts=8, num_experts_per_tok=2)
    rows = routing.main(
        [
            "--model", str(path), "--p", "0.9", "--relative", "0.0", "--entropy-scale", "0.01", "100",
            "--prefill-prompts", "2", "--prompt-len", "8", "--new-tokens", "2", "--repeats", "1",
        ]
    )  # fmt: skip
    by = {r["setting"]: r for r in rows}
    assert list(by) == [
        "top_k (k=2, checkpoint)",
        "top_p p=0.9",
        "relative t=0.0",
        "entropy H<0.006:1 <0.012:2 else 4",
        "entropy H<60.0:1 <120.0:2 else 4",
    ]
    assert by["top_k (k=2, checkpoint)"]["avg_experts_per_token"] == 2.0
    # relative t=0 keeps every expert; entropy: tiny thresholds -> k=4 everywhere, huge ones -> k=1
    assert by["relative t=0.0"]["avg_experts_per_token"] == 8.0
    assert by["entropy H<0.006:1 <0.012:2 else 4"]["avg_experts_per_token"] == 4.0
    assert by["entropy H<60.0:1 <120.0:2 else 4"]["avg_experts_per_token"] == 1.0
    assert all(r["decode_tok_s"] > 0 and r["prefill_moe_s"] > 0 for r in rows)
