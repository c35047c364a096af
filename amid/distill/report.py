"""PNG plots of a run's curves (loss, λ, ROUGE-L) from its metrics records."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List

__all__ = ["write_plots", "read_metrics", "model_card", "Trackers"]


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


def model_card(cfg, summary: Dict[str, Any], arch: str, n_layers: int) -> str:
    """The ``README.md`` model card of a distilled student: how it was made and how it scores."""
    teacher = cfg.teacher if cfg.teacher else "(a model object)"
    settings = [
        ("teacher", teacher), ("student", cfg.student or f"{n_layers} of the teacher's layers"
                                                         + (f" {cfg.student_layers}" if cfg.student_layers else "")),
        ("objective", f"{cfg.kd_weight} * AMiD + {1 - cfg.kd_weight:g} * CE on response tokens"),
        ("AMiD", f"alpha {cfg.alpha}, divergence {cfg.divergence}"
                 + (f" (ab_alpha {cfg.ab_alpha}, ab_beta {cfg.ab_beta})" if cfg.divergence == "ab" else "")
                 + f", order {cfg.order}, temperature {cfg.temperature}"),
        ("lambda schedule", f"{cfg.lam_schedule}" + (f" (lam {cfg.lam})" if cfg.lam_schedule == "constant"
                                                   else f" ({cfg.lam_start} -> {cfg.lam_end})")),
        ("student-generated outputs", "on (adaptive SGO)" if cfg.student_gen else "off"),
        ("optimizer", f"AdamW, lr {cfg.lr}, {cfg.lr_scheduler_type} schedule, warm-up {cfg.warmup_steps} steps"
                      + (f" / ratio {cfg.warmup_ratio}" if cfg.warmup_ratio else "")
                      + f", weight decay {cfg.weight_decay}"),
        ("batch", f"{cfg.micro_batch_size} x {cfg.grad_accum_steps} accumulation x {summary.get('world_size', 1)} "
                  "processes"),
        ("steps", str(summary.get("steps"))), ("seed", str(cfg.seed)),
        ("data", f"train {cfg.train_file}" + (f", validation {cfg.validation_file}" if cfg.validation_file else "")
                 + (f", test {cfg.test_file}" if cfg.test_file else "")),
    ]
    lines = [
        "---", "library_name: transformers", "tags:", "- distillation", "- amid", "- amid-distill", "---", "",
        f"# Distilled student ({arch}, {n_layers} layers)", "",
        "Distilled with `amid-distill` (the AMiD loss: alpha-mixture assistant distribution). Load it with:", "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")",
        "tokenizer = AutoTokenizer.from_pretrained(\"path/to/this/folder\")", "```", "",
        "## Training", "", "| setting | value |", "|---|---|",
    ]
    lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in settings]
    lines += ["", "The full configuration is in `distill_config.json`, the metrics in `metrics.jsonl`.", "",
              "## Evaluation", "", summary.get("table", "(no evaluation data)"), ""]
    return "\n".join(lines)


class Trackers:
    """``report_to``: the metrics records also go to TensorBoard (``output_dir/runs``, through
    ``torch.utils.tensorboard``) and / or Weights & Biases (offline unless ``WANDB_MODE`` says
    otherwise). ``metrics.jsonl`` stays the record of truth. Rank 0 only.

    ``resume_step``: events after it (logged by the interrupted run past its last checkpoint) are
    dropped from the TensorBoard log, so the curves match the metrics of the resumed run.
    """

    _TRAIN = ("loss", "kd", "ce", "lam", "lr", "grad_norm", "tokens_per_s", "sgo_threshold", "generated_share")
    _EVAL = ("kl", "ce", "rouge_l", "exact_match", "answer_acc")

    def __init__(self, cfg, resume_step: int = 0) -> None:
        self.tb = None
        self.wandb = None
        names = cfg.report_trackers()
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=os.path.join(cfg.output_dir, "runs"),
                                    purge_step=resume_step + 1 if resume_step else None)
            self.tb.add_text("config", "```\n" + json.dumps(cfg.to_dict(), indent=1) + "\n```", resume_step)
        if "wandb" in names:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "amid-distill"), dir=cfg.output_dir,
                                    config=cfg.to_dict(), resume="allow")

    def log(self, record: Dict[str, Any]) -> None:
        scalars = {}
        if record.get("type") == "train":
            scalars = {f"train/{k}": record[k] for k in self._TRAIN if isinstance(record.get(k), (int, float))}
        elif record.get("type") == "eval":
            prefix = f"eval/{record.get('split')}/{record.get('model')}"
            scalars = {f"{prefix}/{k}": record[k] for k in self._EVAL if isinstance(record.get(k), (int, float))}
        if not scalars:
            return
        step = int(record.get("step", 0))
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, float(v), step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
