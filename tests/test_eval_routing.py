"""`dynserve eval-routing`: perplexity and experts/token per routing setting, CSV + PNG."""

from __future__ import annotations

import csv
import subprocess
import sys


def test_eval_routing_writes_table_csv_and_plot(mixtral_dir, tmp_path):
    text = tmp_path / "heldout.txt"
    text.write_text("def hello(name):\n    return 'hello ' + name\n" * 30)
    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dynserve.cli",
            "eval-routing",
            str(mixtral_dir),
            "--text-file",
            str(text),
            "--out-dir",
            str(out),
            "--max-tokens",
            "300",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by = {row["setting"]: row for row in rows}
    # the checkpoint's own rule is top-2 (4 experts): exactly 2 experts per token, k=1 exactly 1
    assert float(by["top_k (checkpoint)"]["avg_experts_per_token"]) == 2.0
    assert float(by["top_k k=1"]["avg_experts_per_token"]) == 1.0
    # top-p uses more experts as p grows, and every perplexity is finite and > 1
    p_rows = [row for row in rows if row["policy"] == "top_p"]
    experts = [float(row["avg_experts_per_token"]) for row in p_rows]
    assert experts == sorted(experts) and experts[0] < experts[-1]
    assert all(1.0 < float(row["perplexity"]) < 1e6 for row in rows)
    assert "| top_p p=0.5 |" in r.stdout
