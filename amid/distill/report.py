"""PNG plots of a run's curves (loss, λ, ROUGE-L) from its metrics records."""
from __future__ import annotations

import os
from typing import Any, Dict, List

__all__ = ["write_plots", "read_metrics"]


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file."""
    import json

    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_plots(records: List[Dict[str, Any]], out_dir: str) -> List[str]:
    """Write ``loss.png``, ``lambda.png`` and ``rouge_l.png``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    paths = []

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train objective")
    for key, label in (("ce", "validation CE (student)"), ("kl", "validation KL(teacher‖student)")):
        pts = [(r["step"], r[key]) for r in evals
               if r.get("model") == "student" and r.get("split") == "validation" and r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats per token")
    ax.set_title("Loss")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out_dir, "loss.png"))

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if train:
        ax.plot([r["step"] for r in train], [r["lam"] for r in train], label="λ (teacher weight in the assistant)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("λ")
    ax.set_title("λ schedule")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out_dir, "lambda.png"))

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for split, style in (("validation", "o-"), ("test", "s--")):
        pts = sorted((r["step"], r["rouge_l"]) for r in evals
                     if r.get("model") == "student" and r.get("split") == split and r.get("rouge_l") is not None)
        if pts:
            ax.plot(*zip(*pts), style, label=f"student, {split}")
        teach = [r["rouge_l"] for r in evals
                 if r.get("model") == "teacher" and r.get("split") == split and r.get("rouge_l") is not None]
        if teach:
            ax.axhline(teach[-1], linestyle=":", color="gray" if split == "validation" else "black",
                       label=f"teacher, {split}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("ROUGE-L")
    ax.set_title("ROUGE-L of greedy answers")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out_dir, "rouge_l.png"))
    return paths


def _save(fig, out_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
