"""``amid.distill``: a distillation loop on Hugging Face causal LMs with the AMiD loss.

    from amid.distill import DistillConfig, Distiller
    cfg = DistillConfig(teacher="path/to/teacher", train_file="train.jsonl", validation_file="val.jsonl",
                        kd_weight=0.5, alpha=0.5, lam=0.1, max_steps=200, output_dir="run")
    summary = Distiller(cfg).train()

The console command ``amid-distill`` (:mod:`amid.distill.cli`) exposes the same config as flags and
YAML/JSON files; ``amid-distill --demo`` runs the offline demo. ``run_sweep`` (``amid-distill sweep``) runs
a grid of loss settings × seeds and aggregates it. Needs the ``distill`` extra
(transformers, accelerate, gguf, rouge-score, pyyaml, matplotlib, tqdm).
"""
from .config import ConfigError, DistillConfig, demo_data_path
from .evaluate import answer_accuracy, exact_match, normalize_text, rouge_l, score_predictions
from .schedules import ConstantSchedule, LambdaSchedule, LinearSchedule, TAIDSchedule, make_schedule
from .sgo import AdaptiveSGO, ReplayBuffer
from .sweep import PRESETS, aggregate, plan_sweep, run_sweep

__all__ = [
    "DistillConfig", "ConfigError", "Distiller", "demo_data_path", "LambdaSchedule", "ConstantSchedule",
    "LinearSchedule", "TAIDSchedule", "make_schedule", "AdaptiveSGO", "ReplayBuffer", "rouge_l", "exact_match",
    "answer_accuracy", "normalize_text", "score_predictions", "PRESETS", "run_sweep", "plan_sweep", "aggregate",
]


def __getattr__(name):
    # The trainer imports transformers; load it only when asked for.
    if name in ("Distiller", "StudentEngine"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'amid.distill' has no attribute {name!r}")
