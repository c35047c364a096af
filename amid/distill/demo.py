"""The ``--demo`` preset: SmolLM2-135M-Instruct distilled into a 6-layer student on the shipped data, on CPU.

Sized to finish in about 10 minutes on 2 CPU cores, teacher loading and all evaluations included.
"""
from __future__ import annotations

from typing import Any, Dict

from .config import DEMO_TEACHER, demo_data_path

__all__ = ["demo_settings"]


def demo_settings() -> Dict[str, Any]:
    """Config values of the demo (any of them can still be overridden by a config file or a flag)."""
    return {
        "teacher": DEMO_TEACHER,
        # Teacher layers 0, 6, 12, 17, 23, 29 (of 30): ~50M parameters, 28M of them the tied embedding.
        "student_num_layers": 6,
        "train_file": demo_data_path("train"),
        "validation_file": demo_data_path("validation"),
        "test_file": demo_data_path("test"),
        # A short system prompt keeps sequences short and the teacher's answers brief.
        "system_prompt": "Answer in one short sentence.",
        "max_length": 96,
        "kd_weight": 0.5,
        "alpha": 0.5,
        "divergence": "kl",
        "order": "pr",
        "lam_schedule": "constant",
        "lam": 0.1,
        "lr": 1e-3,
        "warmup_steps": 5,
        "min_lr_ratio": 0.1,
        "micro_batch_size": 8,
        "grad_accum_steps": 1,
        "num_epochs": 2.0,
        "device": "cpu",
        "eval_every": 25,
        "eval_generate_every": 50,
        "eval_batch_size": 25,
        "eval_max_new_tokens": 24,
        "save_every": 50,
        "output_dir": "amid-distill-demo",
    }
