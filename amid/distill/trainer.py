"""The distillation loop: ``Distiller(config).train()``.

Objective per optimizer step (all micro-batches of all ranks together):

    loss = kd_weight · AMiD(student, teacher) + (1 − kd_weight) · CE(student, labels)

Both terms are sums over the response tokens of the whole accumulated (and, under torchrun, the
global) batch divided by their number, so gradient accumulation and data parallelism give the
gradient of one big batch. Only response positions are run through the LM heads: the base
models produce hidden states for every position, then the rows that predict a response token
are gathered (``[N, H]``) before the head (or the fused head + loss) is applied. On batches of
student-generated answers (``student_gen``) only the AMiD term is used: CE against the student's
own samples would only sharpen it. Padded head rows past the tokenizer's vocabulary are cut off
(masked) for both models.

Output (``output_dir``), laid out as Hugging Face users expect: the final student in HF format
(``AutoModelForCausalLM.from_pretrained(output_dir)`` loads it) with its tokenizer and a model card
``README.md``; the run's own config in ``distill_config.json``; checkpoints as ``checkpoint-N/``:
the student in HF format plus ``trainer_state.json`` (step, log history and the whole trainer state:
optimizer, LR scheduler, λ schedule, SGO state, replay buffer, sampler and RNG states of every
rank; its tensors in ``trainer_state.safetensors``, nothing pickled) and ``manifest.json`` (size and
SHA-256 of every file). A checkpoint is written to a temporary folder, synced and renamed, so a run
killed at any moment resumes from the last complete checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import amid

from . import models as M
from .config import ConfigError, DistillConfig, prepare_output_dir
from .data import IGNORE_INDEX, Example, StepSampler, collate_train, encode_records, load_records
from .evaluate import generate_ids, score_predictions
from .schedules import make_schedule
from .state_io import load_state, save_state, sha256_file
from .sgo import DATA, GENERATE, REPLAY, AdaptiveSGO, ReplayBuffer

__all__ = ["Distiller", "StudentEngine"]

_STATE_FILE = "trainer_state.json"
_TENSORS_FILE = "trainer_state.safetensors"
#: The run's own config (``config.json`` in the output directory is the student's HF config).
RUN_CONFIG_FILE = "distill_config.json"
_CKPT_PREFIX = "checkpoint-"
#: Written last into every checkpoint: each file's size and SHA-256, so a truncated or corrupt
#: checkpoint is recognised (and skipped by ``--resume``) before anything is loaded from it.
_MANIFEST = "manifest.json"


# ------------------------------------------------------------------------------------------------
# The student side of a step, as one module so that DDP / FSDP see the whole computation in forward.

def _head_transform(config) -> Tuple[Optional[float], Optional[float]]:
    """(logit scale, final soft-cap) applied by some HF heads after the linear layer (Cohere, Gemma 2)."""
    scale = getattr(config, "logit_scale", None)
    cap = getattr(config, "final_logit_softcapping", None)
    return (None if scale in (None, 1, 1.0) else float(scale)), (None if cap is None else float(cap))


def _apply_head(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], transform) -> Tensor:
    logits = F.linear(hidden, weight, bias)
    scale, cap = transform
    if scale is not None:
        logits = logits * scale
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


class StudentEngine(nn.Module):
    """Holds the student; ``forward(task=...)`` runs the loss, the eval logits or generation.

    Keeping the loss inside ``forward`` lets DistributedDataParallel and FSDP wrap one module whose
    forward uses every trained parameter (the fused loss reads the head weight directly).
    """

    def __init__(self, student: nn.Module, n_vocab: int, loss_options: Dict[str, Any], fused_linear: bool,
                 chunk_size: Optional[int], gjsd_beta: Optional[float] = None) -> None:
        super().__init__()
        self.student = student
        self.gjsd_beta = gjsd_beta
        self.n_vocab = n_vocab
        self.loss_options = dict(loss_options)
        self.fused_linear = fused_linear
        self.chunk_size = chunk_size
        self.transform = _head_transform(student.config)

    def forward(self, task: str, **kw: Any) -> Any:
        if task == "loss":
            return self._loss(**kw)
        if task == "logits":
            return self._logits(**kw)
        if task == "generate":
            return generate_ids(self.student, **kw)
        raise ValueError(f"StudentEngine: unknown task {task!r}")

    def _hidden_rows(self, input_ids: Tensor, attention_mask: Tensor, row_mask: Tensor) -> Tensor:
        out = self.student.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        # Position l predicts token l + 1: keep the positions whose next token is a response token.
        return out.last_hidden_state[:, :-1][row_mask]

    def _head(self) -> Tuple[Tensor, Optional[Tensor]]:
        head = self.student.get_output_embeddings()
        w = head.weight[: self.n_vocab]
        b = head.bias[: self.n_vocab] if getattr(head, "bias", None) is not None else None
        return w, b

    def _logits(self, input_ids: Tensor, attention_mask: Tensor, row_mask: Tensor) -> Tensor:
        w, b = self._head()
        return _apply_head(self._hidden_rows(input_ids, attention_mask, row_mask), w, b, self.transform)

    def _loss(self, input_ids: Tensor, attention_mask: Tensor, row_mask: Tensor, labels: Tensor, teacher_hidden: Tensor,
              teacher_head: Tuple[Tensor, Optional[Tensor], Any], normalizer: Tensor, lam: float, kd_weight: float,
              ce_weight: float) -> Dict[str, Optional[Tensor]]:
        h = self._hidden_rows(input_ids, attention_mask, row_mask)
        w, b = self._head()
        tw, tb, ttransform = teacher_head
        opts = dict(self.loss_options, lam=float(lam))
        if teacher_hidden is None:  # a cross-entropy-only step (SFT warm start, kd_weight 0): no teacher needed
            s = _apply_head(h, w, b, self.transform)
            ce = F.cross_entropy(s.float(), labels, reduction="sum") / normalizer
            return {"loss": ce_weight * ce, "kd": None, "ce": ce}
        if self.gjsd_beta is not None and isinstance(teacher_hidden, dict):
            raise ValueError("amid-distill: config field 'gjsd_beta': the generalized JSD needs the full teacher "
                             "distribution, which a top-k teacher cache does not hold; expected a hidden cache or none")
        if isinstance(teacher_hidden, dict):  # a top-k teacher cache: amid.amid_loss_topk (amid/distill/cache.py)
            from .cache import topk_loss

            return topk_loss(_apply_head(h, w, b, self.transform), teacher_hidden, labels, opts, normalizer,
                             kd_weight, ce_weight)
        if self.fused_linear:
            # The fused op wants each model's hidden states in its head's dtype and manages its own
            # precision, so it runs outside autocast (the heads' GEMMs in the weights' dtype).
            with torch.autocast(device_type=h.device.type, enabled=False):
                loss = amid.fused_linear_amid_loss(
                    h.to(w.dtype), w, teacher_hidden.to(tw.dtype), tw, labels, student_bias=b, teacher_bias=tb,
                    normalizer=normalizer, kd_weight=kd_weight, ce_weight=ce_weight, chunk_size=self.chunk_size,
                    **opts)
            # kd_weight 0 (an SFT step): the fused value is the cross-entropy alone.
            return {"loss": loss, "kd": None, "ce": loss if kd_weight == 0 else None}
        s = _apply_head(h, w, b, self.transform)
        with torch.no_grad():
            t = _apply_head(teacher_hidden.to(tw.dtype), tw, tb, ttransform).to(s.dtype)
        if kd_weight <= 0:
            kd = None
        elif self.gjsd_beta is not None:
            kd = amid.generalized_jsd(s, t, None, beta=self.gjsd_beta, reduction="mean", normalizer=normalizer,
                                      temperature=opts["temperature"], scale_by_t2=opts["scale_by_t2"])
        else:
            kd = amid.amid_loss(s, t, None, reduction="mean", normalizer=normalizer, **opts)
        ce = (F.cross_entropy(s.float(), labels, reduction="sum") / normalizer) if ce_weight > 0 else None
        loss = 0.0
        if kd is not None:
            loss = loss + kd_weight * kd
        if ce is not None:
            loss = loss + ce_weight * ce
        if kd is None and ce is None:  # kd_weight = 0 on a student-generated batch: nothing to learn, zero gradient
            loss = s.sum() * 0.0
        return {"loss": loss, "kd": kd, "ce": ce}


# ------------------------------------------------------------------------------------------------
# Small helpers.

def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())


def _write_manifest(folder: str) -> None:
    """``manifest.json``: size and SHA-256 of every file below ``folder`` (written last)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder).replace(os.sep, "/")
            files[rel] = {"size": os.path.getsize(full), "sha256": sha256_file(full)}
    with open(os.path.join(folder, _MANIFEST), "w", encoding="utf-8") as f:
        json.dump({"files": files}, f, indent=1, sort_keys=True)


def checkpoint_problem(path: str) -> Optional[str]:
    """Why the checkpoint folder ``path`` cannot be resumed from, or ``None`` when it is complete.

    Checks every file against the manifest (size, then SHA-256). A checkpoint without a manifest
    (written by an older amid) needs its trainer state and readable safetensors headers.
    """
    if not os.path.isdir(path):
        return "it is not a directory"
    man = os.path.join(path, _MANIFEST)
    if os.path.isfile(man):
        try:
            with open(man, encoding="utf-8") as f:
                files = json.load(f)["files"]
            items = sorted(files.items())
            for _, info in items:
                int(info["size"]), str(info["sha256"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return f"its {_MANIFEST} is unreadable ({M.one_line(e)})"
        if _STATE_FILE not in files:
            return f"it has no {_STATE_FILE}"
        for rel, info in items:
            full = os.path.join(path, rel)
            if not os.path.isfile(full):
                return f"{rel} is missing"
            size = os.path.getsize(full)
            if size != int(info["size"]):
                return f"{rel} has {size} bytes, expected {int(info['size'])} (truncated?)"
        for rel, info in items:
            if sha256_file(os.path.join(path, rel)) != info["sha256"]:
                return f"{rel} does not match its SHA-256 in {_MANIFEST} (corrupt)"
        return None
    if not os.path.isfile(os.path.join(path, _STATE_FILE)):
        return f"it has no {_STATE_FILE} (not a checkpoint, or an incomplete one)"
    if not os.path.isfile(os.path.join(path, "config.json")):
        return "it has no config.json"
    weights = [n for n in os.listdir(path) if n.endswith(".safetensors")]
    if not any(n.startswith("model") for n in weights):
        return "it has no model*.safetensors"
    try:
        from safetensors import safe_open

        for n in weights:
            with safe_open(os.path.join(path, n), framework="pt"):
                pass
    except Exception as e:  # noqa: BLE001 - SafetensorError / OSError on a truncated file
        return f"{n} is unreadable ({M.one_line(e)})"
    return None


def list_checkpoints(output_dir: str) -> List[str]:
    """The ``checkpoint-N`` folders of a run, newest (largest N) first."""
    names = []
    for d in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        if d.startswith(_CKPT_PREFIX) and d[len(_CKPT_PREFIX):].isdigit():
            names.append((int(d[len(_CKPT_PREFIX):]), d))
    return [os.path.join(output_dir, d) for _, d in sorted(names, reverse=True)]


def _import_before_process_group() -> None:
    """Import what would otherwise be imported after ``init_process_group`` and pin the group.

    Importing ``torch._dynamo`` while a process group exists (DDP and transformers import it
    lazily) leaves references to that group behind (torch 2.14), so ``destroy_process_group``
    no longer frees it: gloo's threads then live until interpreter shutdown, where tearing them
    down races the peer's exit and can abort a finished run ("terminate called without an
    active exception", SIGABRT). Imported first, nothing holds on to the group.
    """
    try:
        import torch._dynamo  # noqa: F401
    except Exception:  # noqa: BLE001 - an optional part of torch; without it there is nothing to pin
        pass


def _peak_rss_mb() -> Optional[float]:
    """This process's peak resident memory in MiB (None where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def _malloc_trim() -> None:
    """Return freed heap memory to the operating system (glibc only; elsewhere nothing happens)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_mb() -> Optional[float]:
    """This process's resident memory now, in MiB (Linux; None elsewhere)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _fused_adamw_ok(params: Sequence[Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes these parameters (floating point, a device it has the kernel for)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:
        return False
    return bool(params) and all(p.dtype.is_floating_point and p.device.type in devices for p in params)


def _rng_state(device: torch.device) -> Dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: Dict[str, Any], device: torch.device) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def _format_table(rows: List[Dict[str, Any]], cols: List[Tuple[str, str]]) -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.4f}"
        return str(v)

    header = "| " + " | ".join(title for _, title in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    lines = [header, sep]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(key)) for key, _ in cols) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------

class Distiller:
    """Distil a student causal LM from a frozen teacher with the AMiD loss.

    ``Distiller(config).train()`` runs the whole job: evaluation before training (teacher and
    student), the loop (with evaluation every ``eval_every`` steps and checkpoints
    ``checkpoint-N/`` every ``save_every`` steps), the final evaluation, the final model in
    ``output_dir`` itself (Hugging Face layout, with a model card ``README.md``), the metrics
    (``metrics.jsonl``), the plots (``plots/*.png``) and the summary table (``summary.md`` /
    ``summary.json``). It returns the summary.

    Models may be given as objects instead of paths (``teacher=``, ``student=``, ``tokenizer=``),
    e.g. for tests; the teacher is put in eval mode and frozen, and only ever runs under
    ``torch.no_grad()`` (never ``inference_mode``: its outputs feed the student's autograd graph).
    Under ``torchrun`` the process group is created here (NCCL on GPU, gloo on CPU).
    """

    def __init__(self, config: DistillConfig, *, teacher: Optional[nn.Module] = None,
                 student: Optional[nn.Module] = None, tokenizer=None, student_tokenizer=None) -> None:
        if teacher is not None and tokenizer is None:
            raise ValueError("amid-distill: a teacher model object needs its tokenizer (tokenizer=...)")
        cfg = config
        cfg.validate(teacher_given=teacher is not None)
        # The output directory first: a bad one fails in a second, before the models are loaded.
        prepare_output_dir(cfg.output_dir, existing_run_ok=bool(cfg.resume) or cfg.overwrite_output_dir)
        self.cfg = cfg
        self._setup_distributed()
        self._rank0 = self.rank == 0
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        # --- resume: find the checkpoint first, since it supplies the student weights --------------
        self.resume_dir: Optional[str] = self._find_checkpoint() if cfg.resume else None
        self._resume_state: Optional[Dict[str, Any]] = None
        if self.resume_dir is not None:
            try:
                self._resume_state = load_state(os.path.join(self.resume_dir, _STATE_FILE))["state"]
            except Exception as e:  # noqa: BLE001 - a damaged state file of a checkpoint without a manifest
                raise ConfigError(f"amid-distill: --resume: cannot read {os.path.join(self.resume_dir, _STATE_FILE)}: "
                                  f"{M.one_line(e)}") from None

        # --- models and tokenizers --------------------------------------------------------------
        attn = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
        t_dtype = getattr(torch, cfg.teacher_torch_dtype)
        self.offline = None  # offline distillation (teacher_cache): no teacher model, see amid/distill/cache.py
        if cfg.teacher_cache:
            from .cache import open_for_training

            self.offline, teacher, tokenizer, student = open_for_training(
                cfg, teacher, tokenizer, student, resume=self.resume_dir is not None,
                student_extra={**attn, **(cfg.student_load_kwargs or {})})
        self._teacher_sharded = cfg.shard_teacher and self.strategy == "fsdp"
        #: How a sharded teacher was loaded (None: loaded whole, then sharded or not).
        self._teacher_load: Optional[Dict[str, Any]] = None
        if teacher is None:
            t_path, t_gguf = M.resolve_model_path(cfg.teacher, cfg.teacher_gguf_file)
            tokenizer = M.load_tokenizer(t_path, t_gguf)
            t_extra = {**attn, **(cfg.teacher_load_kwargs or {})}
            if self._teacher_sharded:
                if t_extra.get("device_map"):
                    raise ConfigError("amid-distill: config field 'shard_teacher': the teacher is placed by a "
                                      "device_map (teacher_load_kwargs); expected one or the other")
                # Built on meta and sharded before any weight is read: no rank ever holds the whole teacher.
                build = student is None and cfg.student is None and self.resume_dir is None
                teacher, built, self._teacher_load = M.load_sharded_teacher(
                    t_path, t_gguf, dtype=t_dtype, device=self.device, extra=t_extra,
                    student_layers=(cfg.student_num_layers, cfg.student_layers) if build else None)
                if built is not None:
                    student = built
            else:
                teacher = M.load_causal_lm(t_path, t_gguf, role="teacher", dtype=t_dtype, extra=t_extra)
        elif next(teacher.parameters()).dtype != t_dtype and not getattr(teacher, "hf_device_map", None):
            teacher = teacher.to(t_dtype)
        self.tokenizer = tokenizer
        s_extra = {**attn, **(cfg.student_load_kwargs or {})}
        if self.resume_dir is not None:
            student = M.load_causal_lm(self.resume_dir, role="student checkpoint", extra=s_extra)
        elif student is None and cfg.student is not None:
            s_path, s_gguf = M.resolve_model_path(cfg.student, cfg.student_gguf_file, field="student")
            student_tokenizer = M.load_tokenizer(s_path, s_gguf)
            student = M.load_causal_lm(s_path, s_gguf, role="student", extra=s_extra)
        elif student is None:
            student = M.build_student_from_teacher(teacher, cfg.student_num_layers, cfg.student_layers)
            if student.dtype != torch.float32:  # a bf16 / fp16 teacher: the student trains in float32
                student = student.float()
        self.n_vocab = M.shared_vocab_size(tokenizer, student_tokenizer, teacher, student)
        self.v_teacher = M.output_head(teacher).weight.shape[0]
        self.v_student = M.output_head(student).weight.shape[0]
        if cfg.fused_linear:
            for who, mdl in (("teacher", teacher), ("student", student)):
                if _head_transform(mdl.config) != (None, None):
                    raise ValueError(f"amid-distill: config field 'fused_linear': the {who} scales or soft-caps its "
                                     "logits after the head, which the fused loss does not model; set fused_linear "
                                     "to false")
        self.pad_id = tokenizer.pad_token_id
        eos: set = set()
        for src in (tokenizer.eos_token_id, getattr(getattr(teacher, "generation_config", None), "eos_token_id", None)):
            if isinstance(src, int):
                eos.add(src)
            elif isinstance(src, (list, tuple)):
                eos.update(int(x) for x in src)
        self.eos_ids = sorted(eos)

        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        # A teacher placed by accelerate (device_map, possibly with CPU offload) stays where it is; a
        # teacher loaded sharded is already on its device.
        self.teacher = (teacher if getattr(teacher, "hf_device_map", None) or self._teacher_load is not None
                        else teacher.to(self.device))
        if self._teacher_sharded and self._teacher_load is None:
            self._shard_teacher()  # a teacher model object: sharded after the fact
        student = student.to(self.device)
        student.train()
        self.student = student
        self._teacher_transform = _head_transform(teacher.config)

        # --- data -----------------------------------------------------------------------------
        def enc(path: Optional[str], name: str) -> Optional[List[Example]]:
            if path is None:
                return None
            return encode_records(tokenizer, load_records(path, split=name), system_prompt=cfg.system_prompt,
                                  max_length=cfg.max_length, source=path)

        self.train_set = enc(cfg.train_file, "train")
        if self.offline is not None:
            self.offline.check_split("train", self.train_set, "train_file")
        self.eval_sets: Dict[str, List[Example]] = {}
        for name, path in (("validation", cfg.validation_file), ("test", cfg.test_file)):
            ex = enc(path, name)
            if ex is not None and self.offline is not None:
                self.offline.check_split(name, ex, f"{name}_file")
            if ex is not None:
                self.eval_sets[name] = ex[: cfg.eval_max_examples] if cfg.eval_max_examples else ex
        self.sampler = StepSampler(len(self.train_set), cfg.micro_batch_size, cfg.grad_accum_steps, self.world,
                                   self.rank, cfg.seed)
        # SFT warm start: sft_steps cross-entropy-only steps come first (own optimizer and LR schedule), then
        # the distillation steps (max_steps, or num_epochs of the data); step counts both.
        self.sft_steps = int(cfg.sft_steps)
        self.distill_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * self.sampler.steps_per_epoch))
        self.total_steps = self.sft_steps + self.distill_steps
        start_step = int(self._resume_state["step"]) if self._resume_state is not None else 0

        # --- engine, parallel wrapper, optimizer, schedules ------------------------------------------
        loss_options = dict(alpha=cfg.alpha, divergence=cfg.divergence, order=cfg.order, ab_alpha=cfg.ab_alpha,
                            ab_beta=cfg.ab_beta, temperature=cfg.temperature, scale_by_t2=cfg.scale_by_t2,
                            detach_assistant=cfg.detach_assistant)
        self.engine_core = StudentEngine(student, self.n_vocab, loss_options, cfg.fused_linear, cfg.chunk_size,
                                         gjsd_beta=cfg.gjsd_beta)
        self.engine = self._wrap(self.engine_core)
        self._make_optimizer("sft" if start_step < self.sft_steps else "distill")
        self.lam_schedule = make_schedule(cfg)
        self.sgo = AdaptiveSGO(cfg.sgo_init_threshold, cfg.sgo_loss_eps, cfg.sgo_replay_ratio,
                               seed=cfg.seed + 17) if cfg.student_gen else None
        # One replay buffer per micro-batch slot of the global batch (slot = m * world + rank), each with
        # its own seed: the run is then the same whatever the split into processes and accumulation steps.
        self.n_slots = cfg.grad_accum_steps * self.world
        self.my_slots = [m * self.world + self.rank for m in range(cfg.grad_accum_steps)]
        slot_cap = math.ceil(cfg.sgo_capacity / self.n_slots)
        self.replay: Optional[Dict[int, ReplayBuffer]] = (
            {k: ReplayBuffer(slot_cap, seed=cfg.seed * 7919 + k) for k in self.my_slots} if cfg.student_gen else None)
        self.step = 0
        self._teacher_cache: Dict[Tuple[str, int], Tensor] = {}
        self._teacher_cache_bytes = 0
        self._records: List[Dict[str, Any]] = []
        self._trackers = None
        self._window: Dict[str, Any] = self._new_window()
        self._pbar = None

        if self._rank0:
            os.makedirs(cfg.output_dir, exist_ok=True)
            if cfg.overwrite_output_dir and self.resume_dir is None:
                # The replaced run's checkpoints go (a later --resume must not pick them up); everything
                # else of it is overwritten by this run's files.
                for old in list_checkpoints(cfg.output_dir):
                    shutil.rmtree(old)
        if self.resume_dir is not None:
            self._load_checkpoint(self.resume_dir)
        else:
            # Sampling in student generation differs per rank; model init above did not.
            torch.manual_seed(cfg.seed + 1000 * (self.rank + 1))
            if self._rank0:
                open(self._metrics_path, "w").close()
        if self._rank0:
            with open(os.path.join(cfg.output_dir, RUN_CONFIG_FILE), "w", encoding="utf-8") as f:
                json.dump(cfg.to_dict(), f, indent=2)
        if self._rank0 and cfg.report_trackers():
            from .report import Trackers

            self._trackers = Trackers(cfg, resume_step=self.step)

    # ------------------------------------------------------------------------------------------
    # setup

    def _setup_distributed(self) -> None:
        cfg = self.cfg
        world_env = int(os.environ.get("WORLD_SIZE", "1"))
        want_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"amid-distill: config field 'device': expected a visible GPU for {cfg.device!r}, but "
                             "torch.cuda.is_available() is False")
        self.distributed = world_env > 1 and cfg.strategy != "none"
        if self.distributed:
            if not dist.is_initialized():
                _import_before_process_group()
                dist.init_process_group("nccl" if want_cuda else "gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            local = int(os.environ.get("LOCAL_RANK", "0"))
        else:
            self.rank, self.world, local = 0, 1, 0
        if want_cuda:
            self.device = torch.device(cfg.device if ":" in cfg.device else f"cuda:{local}")
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.strategy = "none" if not self.distributed else ("fsdp" if cfg.strategy == "fsdp" else "ddp")
        bf16 = cfg.bf16
        if bf16 == "auto":
            self.use_bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        else:
            self.use_bf16 = bf16 == "true"

    def _autocast(self):
        if not self.use_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _wrap(self, engine: StudentEngine) -> nn.Module:
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            return DDP(engine, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                       broadcast_buffers=False)
        if self.strategy == "fsdp":
            try:
                from torch.distributed.fsdp import fully_shard
            except ImportError:  # torch < 2.6
                from torch.distributed._composable.fsdp import fully_shard

            for layer in M.decoder_layers(engine.student):
                fully_shard(layer)
            fully_shard(engine)
            return engine
        return engine

    def _shard_teacher(self) -> None:
        """FSDP2 over the decoder layers of a teacher given as a model object (forward only: no
        gradients, no optimizer state). A teacher loaded from a path is sharded before its weights
        are read instead (``models.load_sharded_teacher``), so no rank ever holds all of it.

        Each layer is gathered for its forward and freed after it, so a rank holds 1/world of the
        layers plus one layer at a time. The embeddings and the output head stay whole on every rank
        (``ignored_params``): the loss reads the head's weight directly, and a tied head shares it.
        Every rank then runs the teacher in lockstep: the cache is off (hits would differ per rank)
        and teacher generation is synced.
        """
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard

        if getattr(self.teacher, "hf_device_map", None):
            raise ConfigError("amid-distill: config field 'shard_teacher': the teacher is placed by a device_map; "
                              "expected one or the other")
        base = self.teacher.base_model
        ignored = set(M.output_head(self.teacher).parameters()) | set(self.teacher.get_input_embeddings().parameters())
        for layer in M.decoder_layers(self.teacher):
            fully_shard(layer, reshard_after_forward=True)
        fully_shard(base, reshard_after_forward=True, ignored_params=ignored)
        # The whole layers this rank loaded are garbage now: hand their memory back to the system
        # (glibc keeps freed blocks otherwise, and the rank would hold as much as an unsharded one).
        import gc

        gc.collect()
        _malloc_trim()

    def _make_optimizer(self, phase: str) -> None:
        """A fresh AdamW and LR schedule for ``phase`` ('sft' or 'distill'; each phase has its own)."""
        cfg = self.cfg
        decay, no_decay = [], []
        for p in self.engine.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        self.phase = phase
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # torch's fused AdamW (one kernel pass per parameter for the whole update) where it supports the
        # parameters: on CPU the default per-tensor loop of elementwise ops took 0.79 s per step for the demo
        # student's 50M parameters, the fused kernel 0.07 s (process CPU time, 2 threads); the same update up to
        # float rounding. Otherwise (or if torch refuses it) the default implementation.
        self.optimizer = None
        if _fused_adamw_ok(decay + no_decay):
            try:
                self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                                   fused=True)
            except (RuntimeError, ValueError):
                self.optimizer = None
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
        self.scheduler = self._make_lr_scheduler(self.sft_steps if phase == "sft" else self.distill_steps)

    def _make_lr_scheduler(self, n_steps: int):
        """``transformers.get_scheduler`` (HF's warm-up: the LR rises from 0 over the warm-up steps)."""
        from transformers import get_scheduler

        cfg = self.cfg
        warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * n_steps)
        name = cfg.lr_scheduler_type
        kwargs: Dict[str, Any] = {}
        if name == "cosine_with_min_lr" or (name == "cosine" and cfg.min_lr_ratio > 0):
            name, kwargs = "cosine_with_min_lr", {"min_lr_rate": cfg.min_lr_ratio}
        return get_scheduler(name, self.optimizer, num_warmup_steps=warmup, num_training_steps=n_steps,
                             scheduler_specific_kwargs=kwargs or None)

    @property
    def _metrics_path(self) -> str:
        return os.path.join(self.cfg.output_dir, "metrics.jsonl")

    def _log(self, record: Dict[str, Any]) -> None:
        self._records.append(record)
        if self._rank0:
            with open(self._metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if self._trackers is not None:
                self._trackers.log(record)

    def _say(self, msg: str) -> None:
        if self._rank0 and self.cfg.progress:
            if self._pbar is not None:
                self._pbar.write(msg)
            else:
                print(msg, flush=True)

    # ------------------------------------------------------------------------------------------
    # teacher

    @torch.no_grad()
    def _teacher_hidden(self, batch: Dict[str, Tensor], keys: Optional[Sequence[Tuple[str, int]]]) -> Tensor:
        """Teacher's final hidden states at the rows that predict a response token, ``[N, Ht]``.

        With ``cache_teacher`` they are kept per example (on CPU) and reused: the teacher is
        frozen and deterministic, and caching saves its forward pass on every later epoch. The
        cache holds at most ``teacher_cache_mb``; once full, new examples are not cached (the
        cached ones keep their hits; evicting would miss every time on a cyclic epoch order).
        """
        if self.offline is not None:
            return self.offline.hidden(keys, self.device)
        use_cache = self.cfg.cache_teacher and keys is not None and not self._teacher_sharded
        if use_cache and all(k in self._teacher_cache for k in keys):
            return torch.cat([self._teacher_cache[k] for k in keys]).to(self.device)
        row_mask = batch["labels"][:, 1:] != IGNORE_INDEX
        with self._autocast():
            out = self.teacher.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                          use_cache=False)
        h = out.last_hidden_state[:, :-1][row_mask]
        if use_cache:
            budget = self.cfg.teacher_cache_mb * 2**20
            for k, part in zip(keys, torch.split(h, row_mask.sum(1).tolist())):
                size = part.numel() * part.element_size()
                if k in self._teacher_cache or self._teacher_cache_bytes + size > budget:
                    continue  # full: the examples already cached stay, the others are recomputed
                self._teacher_cache[k] = part.to("cpu", copy=True)
                self._teacher_cache_bytes += size
        return h

    def _teacher_head(self) -> Tuple[Tensor, Optional[Tensor], Any]:
        head = M.output_head(self.teacher)
        b = head.bias[: self.n_vocab] if head.bias is not None else None
        return head.weight[: self.n_vocab], b, self._teacher_transform

    # ------------------------------------------------------------------------------------------
    # one optimizer step

    def _sync_context(self, last: bool):
        if self.strategy == "ddp" and not last:
            return self.engine.no_sync()
        if self.strategy == "fsdp":
            self.engine.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _step_items(self) -> Tuple[str, List[List[Dict[str, List[int]]]], Optional[List[List[Tuple[str, int]]]]]:
        """The batch source of this step and its micro-batches of token sequences."""
        idx_batches = self.sampler.next_step()
        kind = DATA
        if self.sgo is not None and self.phase == "distill":
            kind = self.sgo.choose(self.step - self.sft_steps, self.distill_steps, self.replay_size,
                                   self.replay_capacity)
        if kind == DATA:
            items = [[{"input_ids": self.train_set[i].input_ids, "labels": self.train_set[i].labels} for i in mb]
                     for mb in idx_batches]
            return kind, items, [[("train", i) for i in mb] for mb in idx_batches]
        if kind == GENERATE:
            items = []
            for slot, mb in zip(self.my_slots, idx_batches):
                # Sampling seeded by (seed, step, slot): the same answers for the same global batch,
                # however it is split over ranks, and without touching the global RNG stream.
                with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                    torch.manual_seed((self.cfg.seed * 1_000_003 + self.step) * 1_009 + slot)
                    items.append(self._student_samples([self.train_set[i].prompt_ids for i in mb]))
                self.replay[slot].add(items[-1])
            return kind, items, None
        return kind, [self.replay[slot].sample(len(mb)) for slot, mb in zip(self.my_slots, idx_batches)], None

    @property
    def replay_size(self) -> int:
        """Sequences in the replay buffers of all slots (every slot holds the same number)."""
        return 0 if self.replay is None else len(self.replay[self.my_slots[0]]) * self.n_slots

    @property
    def replay_capacity(self) -> int:
        return 0 if self.replay is None else self.replay[self.my_slots[0]].capacity * self.n_slots

    def _student_samples(self, prompts: List[List[int]]) -> List[Dict[str, List[int]]]:
        """Student-sampled answers (sampling settings ``gen_*``, separate from the loss temperature)."""
        cfg = self.cfg
        was_training = self.engine_core.student.training
        self.engine_core.student.eval()
        gen = self._gen_call(prompts, do_sample=True, temperature=cfg.gen_temperature, top_p=cfg.gen_top_p,
                             top_k=cfg.gen_top_k, max_new_tokens=cfg.gen_max_new_tokens)
        self.engine_core.student.train(was_training)
        out = []
        for p, g in zip(prompts, gen):
            g = g[: max(1, cfg.max_length - len(p))]
            out.append({"input_ids": list(p) + g, "labels": [IGNORE_INDEX] * len(p) + g})
        return out

    def _gen_call(self, prompts: List[List[int]], **kw: Any) -> List[List[int]]:
        engine = self.engine.module if self.strategy == "ddp" else self.engine
        return engine(task="generate", prompts=prompts, pad_id=self.pad_id, eos_ids=self.eos_ids, device=self.device,
                      n_vocab=self.n_vocab, synced_gpus=self.strategy == "fsdp",
                      autocast=self._autocast if self.use_bf16 else None, **kw)

    def _accumulate(self, items: List[List[Dict[str, List[int]]]], keys, ce_on: bool) -> Dict[str, Tensor]:
        """Forward + backward over this rank's micro-batches; the loss is normalised over the global batch."""
        cfg = self.cfg
        batches = [collate_train(mb, self.pad_id) for mb in items]
        counts = torch.tensor([sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches),
                               sum(int(b["attention_mask"].sum()) for b in batches)], dtype=torch.float64,
                              device=self.device)
        if self.distributed:
            dist.all_reduce(counts)
        # DDP / FSDP average the gradients over ranks, hence the division by the world size.
        normalizer = (counts[0].clamp_min(1) / self.world).to(torch.float32)
        kd_w = float(cfg.kd_weight) if self.phase == "distill" else 0.0
        ce_w = (1.0 - kd_w) if ce_on else 0.0
        need_teacher = kd_w > 0 or cfg.fused_linear
        sums = {"loss": torch.zeros((), device=self.device), "kd": torch.zeros((), device=self.device),
                "ce": torch.zeros((), device=self.device)}
        lam = self.lam_schedule.value
        for i, b in enumerate(batches):
            b = {k: v.to(self.device) for k, v in b.items()}
            row_mask = b["labels"][:, 1:] != IGNORE_INDEX
            labels = b["labels"][:, 1:][row_mask]
            t_hidden = self._teacher_hidden(b, keys[i] if keys is not None else None) if need_teacher else None
            with self._sync_context(i == len(batches) - 1):
                with self._autocast():
                    out = self.engine(task="loss", input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                      row_mask=row_mask, labels=labels, teacher_hidden=t_hidden,
                                      teacher_head=self._teacher_head(), normalizer=normalizer, lam=lam,
                                      kd_weight=kd_w, ce_weight=ce_w)
                out["loss"].backward()
            sums["loss"] += out["loss"].detach().float()
            if out["kd"] is not None:
                sums["kd"] += out["kd"].detach().float()
            if out["ce"] is not None:
                sums["ce"] += out["ce"].detach().float()
            for k in ("tail_teacher", "tail_student"):  # a top-k teacher cache: the tail's share (cache.tail_shares)
                if out.get(k) is not None:
                    sums[k] = sums.get(k, torch.zeros((), device=self.device)) + out[k].detach().float()
        sums["tokens"] = counts[1]
        sums["response_tokens"] = counts[0]
        return sums

    def _clip(self) -> Tensor:
        params = [p for p in self.engine.parameters() if p.grad is not None]
        # max_norm = inf only measures the norm (clipping disabled).
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP
            norm = norm.full_tensor()
        return norm.detach()

    def _global_mean(self, t: Tensor) -> Tensor:
        # Each rank's value is its share of the global mean (sum / (N / world)): average over ranks.
        if self.distributed:
            t = t.clone()
            dist.all_reduce(t)
            t = t / self.world
        return t

    def _new_window(self) -> Dict[str, Any]:
        return {"loss": 0.0, "kd": 0.0, "ce": 0.0, "tokens": 0.0, "steps": 0, "t0": time.perf_counter(),
                "kinds": {DATA: 0, GENERATE: 0, REPLAY: 0}, "grad_norm": 0.0}

    def train_step(self) -> Dict[str, Any]:
        """One optimizer step (all micro-batches). Returns the step's local tensors and batch kind."""
        self.engine_core.student.train()
        kind, items, keys = self._step_items()
        self.optimizer.zero_grad(set_to_none=True)
        sums = self._accumulate(items, keys, ce_on=kind == DATA)
        grad_norm = self._clip()
        lr = self.scheduler.get_last_lr()[0]
        lam = self.lam_schedule.value
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        phase = self.phase
        if phase == "distill":
            loss_value: Optional[float] = None
            if self.lam_schedule.needs_loss:
                loss_value = float(self._global_mean(sums["loss"]))
            self.lam_schedule.step(loss_value, self.step - self.sft_steps, self.distill_steps)
        return {"kind": kind, "sums": sums, "grad_norm": grad_norm, "lr": lr, "lam": lam, "phase": phase}

    # ------------------------------------------------------------------------------------------
    # evaluation

    def _shard(self, n: int) -> List[int]:
        """This rank's example indices (round robin), padded with -1 so every rank runs as many batches."""
        mine = list(range(self.rank, n, self.world))
        per = math.ceil(n / self.world)
        return mine + [-1] * (per - len(mine))

    def _gather(self, obj: Any) -> List[Any]:
        if not self.distributed:
            return [obj]
        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    @torch.no_grad()
    def evaluate(self, split: str, who: str = "student", *, generate: bool = True,
                 phase: str = "during") -> Dict[str, Any]:
        """Evaluate the student or the teacher on a split.

        Token level (every split): the mean over response tokens of KL(teacher ‖ model) and of the
        model's cross-entropy on the reference answer. With ``generate``: greedy answers to the
        prompts scored by ROUGE-L, exact match and (when the data has ``answer``) answer accuracy.
        """
        cfg = self.cfg
        t0 = time.perf_counter()
        data = self.eval_sets[split]
        shard = self._shard(len(data))
        bs = cfg.eval_batch_size
        model_is_teacher = who == "teacher"
        eval_engine = self.engine.module if self.strategy == "ddp" else self.engine
        self.engine_core.student.eval()
        kl_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        ce_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        n_tok = torch.zeros((), dtype=torch.float64, device=self.device)
        for j in range(0, len(shard), bs):
            idx = shard[j:j + bs]
            real = [i for i in idx if i >= 0]
            batch_idx = real if real else [0]  # a padding-only batch still runs (FSDP collectives)
            b = collate_train([{"input_ids": data[i].input_ids, "labels": data[i].labels} for i in batch_idx],
                              self.pad_id)
            b = {k: v.to(self.device) for k, v in b.items()}
            row_mask = b["labels"][:, 1:] != IGNORE_INDEX
            labels = b["labels"][:, 1:][row_mask]
            th = self._teacher_hidden(b, [(split, i) for i in batch_idx])
            tw, tb, tt = self._teacher_head()
            t_logits = (self.offline.dense_logits(th, self.n_vocab) if isinstance(th, dict)  # top-k cache
                        else _apply_head(th.to(tw.dtype), tw, tb, tt).float())
            if model_is_teacher:
                s_logits = t_logits
            else:
                with self._autocast():
                    s_logits = eval_engine(task="logits", input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                           row_mask=row_mask)
                s_logits = s_logits.float()
            if not real:
                continue
            kl = amid.forward_kl(s_logits, t_logits, reduction="sum") if not model_is_teacher else torch.zeros(())
            kl_sum += kl.double().to(self.device)
            ce_sum += F.cross_entropy(s_logits, labels, reduction="sum").double()
            n_tok += labels.numel()
        stats = torch.stack([kl_sum, ce_sum, n_tok])
        if self.distributed:
            dist.all_reduce(stats)
        n = max(1.0, float(stats[2]))
        rec: Dict[str, Any] = {"type": "eval", "phase": phase, "step": self.step, "split": split, "model": who,
                               "kl": None if model_is_teacher else float(stats[0]) / n, "ce": float(stats[1]) / n,
                               "n": len(data)}
        if generate:
            preds: List[Tuple[int, str]] = []
            for j in range(0, len(shard), bs):
                idx = shard[j:j + bs]
                real = [i for i in idx if i >= 0]
                prompts = [data[i if i >= 0 else (real[0] if real else 0)].prompt_ids for i in idx]
                if model_is_teacher:
                    gen = generate_ids(self.teacher, prompts, pad_id=self.pad_id, eos_ids=self.eos_ids,
                                       max_new_tokens=cfg.eval_max_new_tokens, device=self.device, n_vocab=self.n_vocab,
                                       synced_gpus=self._teacher_sharded,
                                       autocast=self._autocast if self.use_bf16 else None)
                else:
                    gen = self._gen_call(prompts, do_sample=False, max_new_tokens=cfg.eval_max_new_tokens)
                for i, g in zip(idx, gen):
                    if i >= 0:
                        preds.append((i, self.tokenizer.decode(g, skip_special_tokens=True).strip()))
            all_preds = sorted(p for part in self._gather(preds) for p in part)
            texts = [t for _, t in all_preds]
            rec.update(score_predictions(texts, [data[i].reference for i, _ in all_preds],
                                         [data[i].answer for i, _ in all_preds]))
            if self._rank0:
                pdir = os.path.join(cfg.output_dir, "predictions")
                os.makedirs(pdir, exist_ok=True)
                with open(os.path.join(pdir, f"{phase}-step{self.step:06d}-{who}-{split}.jsonl"), "w",
                          encoding="utf-8") as f:
                    for (i, t) in all_preds:
                        f.write(json.dumps({"prompt": self.tokenizer.decode(data[i].prompt_ids),
                                            "reference": data[i].reference, "prediction": t}) + "\n")
        self.engine_core.student.train()
        rec["seconds"] = time.perf_counter() - t0
        self._log(rec)
        return rec

    def _eval_round(self, phase: str, generate: bool) -> Dict[str, Any]:
        """Validation losses (and generation) for the student; feeds the adaptive SGO switch."""
        out = {}
        if "validation" in self.eval_sets:
            out = self.evaluate("validation", "student", generate=generate, phase=phase)
            if self.sgo is not None and phase != "final":
                if self.sgo.observe(out["ce"]):
                    self._say(f"[amid-distill] step {self.step}: validation CE {out['ce']:.4f} did not improve; "
                              f"student-generated share threshold -> {self.sgo.threshold:.1f}")
        return out

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def _find_checkpoint(self) -> str:
        """The checkpoint to resume from: ``resume`` is a path, or true/'latest' for the newest complete
        ``checkpoint-N`` in output_dir (incomplete ones are skipped, saying why); else a ConfigError."""
        cfg = self.cfg
        if isinstance(cfg.resume, str) and cfg.resume != "latest":
            problem = checkpoint_problem(cfg.resume)
            if problem is not None:
                raise ConfigError(f"amid-distill: config field 'resume': '{cfg.resume}' is not a complete checkpoint: "
                                  f"{problem}")
            return cfg.resume
        cands = list_checkpoints(cfg.output_dir)
        if not cands:
            raise ConfigError(f"amid-distill: --resume: no checkpoint-N in '{cfg.output_dir}' to resume from (run "
                              "without --resume to start a new run)")
        skipped = []
        for path in cands:
            problem = checkpoint_problem(path)
            if problem is None:
                if skipped and _is_rank0():
                    for p in skipped:
                        print(f"[amid-distill] --resume: skipped {p}", flush=True)
                return path
            skipped.append(f"{path}: {problem}")
        raise ConfigError(f"amid-distill: --resume: no complete checkpoint in '{cfg.output_dir}' ("
                          + "; ".join(skipped) + ")")

    def _student_state_dict(self) -> Dict[str, Tensor]:
        """Full student weights (CPU) on rank 0 (a collective under FSDP)."""
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(self.engine, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return {k[len("student."):]: v for k, v in sd.items() if k.startswith("student.")}
        return {k: v.detach().to("cpu") for k, v in self.engine_core.student.state_dict().items()}

    def _optimizer_state(self) -> Dict[str, Any]:
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.engine, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def save_checkpoint(self) -> Optional[str]:
        """Write ``output_dir/checkpoint-N`` atomically (rank 0 writes; every rank takes part)."""
        cfg = self.cfg
        sd = self._student_state_dict()
        optim = self._optimizer_state()
        per_rank = self._gather({"rng": _rng_state(self.device),
                                 "replay": ({k: b.state_dict() for k, b in self.replay.items()}
                                            if self.replay is not None else None)})
        path = None
        if self._rank0:
            root = cfg.output_dir
            name = f"{_CKPT_PREFIX}{self.step}"
            path = os.path.join(root, name)
            tmp = os.path.join(root, f".tmp-{name}")
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
            os.makedirs(tmp)
            self.engine_core.student.save_pretrained(tmp, state_dict=sd)
            self.tokenizer.save_pretrained(tmp)
            state = {
                "step": self.step, "total_steps": self.total_steps, "world_size": self.world,
                "optimizer": optim, "scheduler": self.scheduler.state_dict(),
                "lam_schedule": self.lam_schedule.state_dict(), "sgo": self.sgo.state_dict() if self.sgo else None,
                "sampler": self.sampler.state_dict(), "per_rank": per_rank, "config": cfg.to_dict(),
                "records": self._records,
            }
            # The readable part first, as in Hugging Face's trainer_state.json.
            head = {"global_step": self.step, "max_steps": self.total_steps,
                    "log_history": [r for r in self._records if r.get("type") == "train"], "format": "amid-distill/1"}
            save_state(state, os.path.join(tmp, _STATE_FILE), os.path.join(tmp, _TENSORS_FILE), extra=head)
            _write_manifest(tmp)
            _fsync_tree(tmp)
            if os.path.exists(path):
                shutil.rmtree(path)
            os.rename(tmp, path)
            for old in list_checkpoints(root)[cfg.save_total_limit:]:
                shutil.rmtree(old, ignore_errors=True)
        if self.distributed:
            dist.barrier()
        return path

    def _load_checkpoint(self, path: str) -> None:
        state = self._resume_state
        self._resume_state = None
        saved_cfg = state.get("config", {})
        ignore = {"resume", "overwrite_output_dir", "output_dir", "progress", "plots", "log_every", "save_every",
                  "save_total_limit", "report_to", "cache_teacher", "teacher_cache_mb"}
        diffs = sorted(k for k, v in self.cfg.to_dict().items() if k not in ignore and saved_cfg.get(k, v) != v)
        if diffs:
            warnings.warn(f"amid-distill: --resume: these config fields differ from the checkpoint's: {diffs}; "
                          "the continued run will not match an uninterrupted one")
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.engine, self.optimizer, optim_state_dict=state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.lam_schedule.load_state_dict(state["lam_schedule"])
        if self.sgo is not None and state["sgo"] is not None:
            self.sgo.load_state_dict(state["sgo"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        if int(state["total_steps"]) != self.total_steps:
            warnings.warn(f"amid-distill: --resume: the checkpoint's run had {state['total_steps']} steps, this one "
                          f"has {self.total_steps}; the LR and λ schedules now follow the new length")
        per_rank = state["per_rank"]
        if len(per_rank) == self.world:
            _set_rng_state(per_rank[self.rank]["rng"], self.device)
        else:
            warnings.warn(f"amid-distill: --resume: the checkpoint was written by {len(per_rank)} processes, this run "
                          f"has {self.world}; the RNG states are re-seeded")
            torch.manual_seed(self.cfg.seed + 1000 * (self.rank + 1) + self.step)
        if self.replay is not None:
            saved = {}
            for r in per_rank:
                saved.update(r["replay"] or {})
            if sorted(saved) == list(range(self.n_slots)):
                for k in self.my_slots:
                    self.replay[k].load_state_dict(saved[k])
            elif saved:
                warnings.warn(f"amid-distill: --resume: the checkpoint has {len(saved)} replay-buffer slots, this run "
                              f"has {self.n_slots}; the saved sequences are dealt out again")
                items = [it for k in sorted(saved) for it in saved[k]["items"]]
                for k in self.my_slots:
                    self.replay[k].add(items[k::self.n_slots])
        # The metrics of the checkpointed part of the run; anything logged after it is dropped.
        self._records = [r for r in state.get("records", []) if r.get("phase") != "final"]
        if self._rank0:
            with open(self._metrics_path, "w", encoding="utf-8") as f:
                for r in self._records:
                    f.write(json.dumps(r) + "\n")
            print(f"[amid-distill] resumed from {path} at step {self.step}/{self.total_steps}", flush=True)

    # ------------------------------------------------------------------------------------------
    # the run

    def _has_record(self, **match: Any) -> bool:
        return any(all(r.get(k) == v for k, v in match.items()) for r in self._records)

    def _initial_evaluation(self) -> None:
        cfg = self.cfg
        gen_split = "test" if "test" in self.eval_sets else "validation"
        for split in self.eval_sets:
            if (cfg.eval_teacher and (self.offline is None or self.offline.mode == "hidden")
                    and not self._has_record(type="eval", phase="before", model="teacher", split=split)):
                # The frozen teacher is evaluated once; its (slow) generations only on the summary's split.
                self.evaluate(split, "teacher", generate=split == gen_split and self.offline is None,
                              phase="before")
            if not cfg.eval_student_before and not (self.sgo is not None and split == "validation"):
                continue
            if not self._has_record(type="eval", phase="before", model="student", split=split):
                rec = self.evaluate(split, "student", generate=cfg.eval_student_before, phase="before")
                if split == "validation" and self.sgo is not None and self.sgo.ref_loss is None:
                    self.sgo.observe(rec["ce"])

    def train(self, stop_after: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """Run (or continue) training; returns the summary, or None when stopped early by ``stop_after``.

        ``stop_after=k`` stops after optimizer step ``k`` (after its evaluation and checkpoint), as
        if the process had been killed there; the schedules still span the full run.
        """
        cfg = self.cfg
        t_start = time.perf_counter()
        if self.step == 0:
            self._initial_evaluation()
        if self._rank0 and cfg.progress:
            from tqdm.auto import tqdm

            self._pbar = tqdm(total=self.total_steps, initial=self.step, desc="amid-distill", dynamic_ncols=True,
                              file=sys.stderr)
        try:
            while self.step < self.total_steps:
                out = self.train_step()
                self._after_step(out)
                if self.sft_steps and self.step == self.sft_steps:
                    self._end_sft()  # evaluates and checkpoints
                else:
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                        gen = bool(cfg.eval_generate_every) and self.step % cfg.eval_generate_every == 0
                        self._eval_round("during", generate=gen)
                    if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == self.total_steps:
                        self.save_checkpoint()
                if stop_after is not None and self.step >= stop_after and self.step < self.total_steps:
                    return None
        finally:
            if self._pbar is not None:
                self._pbar.close()
                self._pbar = None
            if self._trackers is not None:
                self._trackers.flush()
        summary = self._finish(time.perf_counter() - t_start)
        if self._trackers is not None:
            self._trackers.close()
        return summary

    def _end_sft(self) -> None:
        """End of the SFT warm start: evaluate the warmed student (phase 'sft'), switch to distillation
        (fresh AdamW and LR schedule) and checkpoint, so a resumed run starts its distillation here."""
        for split in self.eval_sets:
            if not self._has_record(type="eval", phase="sft", model="student", split=split):
                self.evaluate(split, "student", generate=True, phase="sft")
        self._make_optimizer("distill")
        self.save_checkpoint()

    def _after_step(self, out: Dict[str, Any]) -> None:
        cfg = self.cfg
        w = self._window
        w["steps"] += 1
        w["kinds"][out["kind"]] += 1
        for k in ("loss", "kd", "ce"):
            w[k] = w[k] + out["sums"][k]
        for k in ("tail_teacher", "tail_student"):
            if k in out["sums"]:
                w[k] = w.get(k, 0.0) + out["sums"][k]
        w["tokens"] = w["tokens"] + out["sums"]["tokens"]
        w["grad_norm"] = out["grad_norm"]
        if self._pbar is not None:
            self._pbar.update(self.step - self._pbar.n)
        if self.step % cfg.log_every and self.step != self.total_steps and self.step != self.sft_steps:
            return
        vals = torch.stack([w["loss"], w["kd"], w["ce"]]).float() / w["steps"]
        vals = self._global_mean(vals).tolist()
        elapsed = time.perf_counter() - w["t0"]
        sft = out["phase"] == "sft"
        rec = {"type": "train", "phase": out["phase"], "step": self.step, "epoch": self.sampler.epoch, "loss": vals[0],
               "kd": vals[1] if not cfg.fused_linear and cfg.kd_weight > 0 and not sft else None,
               "ce": vals[2] if (not cfg.fused_linear or sft) and (cfg.kd_weight < 1 or sft) else None,
               "lam": out["lam"], "lr": out["lr"], "grad_norm": float(w["grad_norm"]),
               "tokens_per_s": float(w["tokens"]) / max(elapsed, 1e-9),
               "batches": dict(w["kinds"])}
        if self.sgo is not None:
            rec.update(sgo_threshold=self.sgo.threshold, generated_share=self.sgo.generated_share,
                       replay_size=self.replay_size)
        if "tail_teacher" in w:
            # Training from a top-k cache: the mean over kept tokens of the teacher's probability mass
            # outside its top-k, and of the student's mass on those same tokens.
            tails = self._global_mean(torch.stack([w["tail_teacher"], w["tail_student"]]).float() / w["steps"]).tolist()
            rec.update(topk_tail_teacher=tails[0], topk_tail_student=tails[1])
        self._log(rec)
        if self._pbar is not None:
            post = {"loss": f"{vals[0]:.4f}", "lam": f"{out['lam']:.3f}", "tok/s": f"{rec['tokens_per_s']:.0f}"}
            if self.sgo is not None:
                post["sgo"] = f"{self.sgo.threshold:.1f}"
            self._pbar.set_postfix(post)
        self._window = self._new_window()

    def _finish(self, train_time: float) -> Dict[str, Any]:
        """Final evaluation, final model, summary table, plots."""
        cfg = self.cfg
        for split in self.eval_sets:
            self.evaluate(split, "student", generate=True, phase="final")
        final_dir = cfg.output_dir  # HF layout: from_pretrained(output_dir) loads the student
        sd = self._student_state_dict()
        if self._rank0:
            self.engine_core.student.save_pretrained(final_dir, state_dict=sd)
            self.tokenizer.save_pretrained(final_dir)
        summary = self._summary(train_time)
        # Memory per rank: the teacher's parameters this rank holds (shards count their local part)
        # and the process's peak resident memory.
        local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in self.teacher.parameters())
        t_bytes = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
                      for p in self.teacher.parameters())
        summary["per_rank"] = self._gather({"teacher_params": int(local), "teacher_mb": t_bytes / 2**20,
                                            "peak_rss_mb": _peak_rss_mb(), "rss_mb": _rss_mb()})
        summary["teacher_sharded"] = self._teacher_sharded
        if self._teacher_load is not None:
            summary["teacher_load"] = self._gather(self._teacher_load)
        summary["teacher_dtype"] = self.cfg.teacher_torch_dtype
        if self._rank0:
            from .report import model_card, write_plots

            with open(os.path.join(cfg.output_dir, "summary.json"), "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
            with open(os.path.join(cfg.output_dir, "summary.md"), "w", encoding="utf-8") as f:
                f.write(summary["table"] + "\n")
            _atomic_write_text(os.path.join(cfg.output_dir, "README.md"),
                               model_card(cfg, summary, type(self.engine_core.student).__name__,
                                          self.engine_core.student.config.num_hidden_layers))
            if cfg.plots:
                summary["plots"] = write_plots(self._records, os.path.join(cfg.output_dir, "plots"))
            print("\n" + summary["table"] + "\n", flush=True)
            print(f"[amid-distill] student: {final_dir}\n[amid-distill] metrics: {self._metrics_path}"
                  + (f"\n[amid-distill] plots: {os.path.join(cfg.output_dir, 'plots')}" if cfg.plots else ""),
                  flush=True)
        if self.distributed:
            dist.barrier()
        return summary

    def _summary(self, train_time: float) -> Dict[str, Any]:
        gen_split = "test" if "test" in self.eval_sets else ("validation" if "validation" in self.eval_sets else None)

        def pick(phase: str, model: str, split: Optional[str]) -> Dict[str, Any]:
            if split is None:
                return {}
            rs = [r for r in self._records if r.get("type") == "eval" and r.get("phase") == phase
                  and r.get("model") == model and r.get("split") == split]
            return rs[-1] if rs else {}

        rows = []
        for label, phase, model in (("teacher", "before", "teacher"), ("student (before)", "before", "student"),
                                    ("student (after SFT)", "sft", "student"), ("student (after)", "final", "student")):
            g = pick(phase, model, gen_split)
            v = pick(phase, model, "validation")
            if not g and not v:
                continue
            rows.append({"model": label, "rouge_l": g.get("rouge_l"), "exact_match": g.get("exact_match"),
                         "answer_acc": g.get("answer_acc"), "val_kl": v.get("kl"), "val_ce": v.get("ce")})
        split_name = gen_split or "-"
        cols = [("model", "model"), ("rouge_l", f"{split_name} ROUGE-L"), ("exact_match", f"{split_name} EM %"),
                ("answer_acc", f"{split_name} answer acc %"), ("val_kl", "val KL(teacher‖model)"),
                ("val_ce", "val CE")]
        return {"rows": rows, "table": _format_table(rows, cols), "steps": self.step,
                "train_seconds_this_process": train_time, "generation_split": gen_split,
                "strategy": self.strategy, "world_size": self.world, "bf16": self.use_bf16,
                "output_dir": self.cfg.output_dir}
