"""Offline distillation: run the teacher once, store it, train without the teacher in memory.

    amid-distill cache-teacher --config run.yaml --teacher-cache teacher-cache/    # once
    amid-distill --config run.yaml --teacher-cache teacher-cache/                  # every run after

Modes (``--mode``):

* ``hidden`` (exact): the teacher's final hidden state (after the final norm) of every kept token
  (the positions that predict a response token, as in training), plus the teacher's output head
  once (weight, bias, logit scale, final soft-cap). Training recomputes the teacher logits from
  them, through the same head code (or ``amid.fused_linear_amid_loss`` with ``fused_linear``), so
  the loss and its gradients equal online distillation (float32: to rounding). H × size(dtype)
  bytes per token.
* ``topk`` (approximate): the teacher's top-k log-probabilities (float16 / bfloat16), their indices
  (int32) and the log of the tail mass (float32) per kept token, for the sparse-teacher loss
  :func:`amid.amid_loss_topk` (config ``topk_tail``: ``bucket`` or ``renorm``). k × 6 + 4 bytes per
  token. Training from it is approximate; evaluation uses the renormalised top-k teacher.

Layout of a cache directory::

    index.json                     the manifest (written last: a directory without it is no cache)
    head.safetensors               teacher head: weight [V_teacher, H] (+ bias)   (hidden mode)
    tokenizer/                     the teacher's tokenizer (training loads it from here)
    student-init/                  the student built from the teacher's layers, when the config has
                                   no ``student`` (training from the cache starts from it)
    <split>-00000.safetensors ...  shards of consecutive examples: ``offsets`` [n + 1] (int64, rows of
                                   each example) and ``hidden`` [rows, H] or ``logprobs`` / ``indices``
                                   / ``tail_logmass`` [rows, k]

The manifest records the mode, per split the dataset fingerprint (SHA-256 of the tokenized
records: input ids and labels), the tokenizer's fingerprint, the teacher's identity (config
value, class, dtype, SHA-256 of its weights), the logit transform, the data options (max_length,
system_prompt) and every shard's size and SHA-256. Writing is resumable at shard granularity and
atomic: each shard is written to a temporary file, synced and renamed; ``progress.json`` lists the
finished shards; a killed run (or a full disk) leaves only complete shards, and rerunning the same
command continues from them. Reading checks every shard's size when the cache is opened and its
SHA-256 the first time the shard is used: a missing, truncated or corrupted shard is an error naming
the file, never a silently wrong teacher.
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .config import ConfigError, DistillConfig
from .state_io import sha256_file

__all__ = ["cache_teacher", "OfflineTeacher", "CacheError", "main", "INDEX_FILE", "FORMAT"]

FORMAT = "amid-teacher-cache/1"
INDEX_FILE = "index.json"
PROGRESS_FILE = "progress.json"
HEAD_FILE = "head.safetensors"
TOKENIZER_DIR = "tokenizer"
STUDENT_DIR = "student-init"
MODES = ("hidden", "topk")
_STORE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}
_DTYPE_NAME = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
#: Config attributes of heads that transform the logits in ways this cache does not reproduce.
_UNSUPPORTED_HEAD_ATTRS = ("logits_scaling", "lm_head_multiplier", "output_multiplier_scale", "mup_width_multiplier",
                           "logits_soft_cap")


class CacheError(ConfigError):
    """A teacher cache that cannot be used (a ``ConfigError``: one line, naming the field or file)."""


def _tag(cache_dir: str) -> str:
    return f"amid-distill: config field 'teacher_cache' ('{cache_dir}')"


# ------------------------------------------------------------------------------------------------
# Fingerprints

def data_fingerprint(examples: Sequence[Any]) -> str:
    """SHA-256 of tokenized records: every example's input ids and labels, in order."""
    h = hashlib.sha256()
    for ex in examples:
        ids = torch.tensor(ex.input_ids, dtype=torch.int64).numpy().tobytes()
        lab = torch.tensor(ex.labels, dtype=torch.int64).numpy().tobytes()
        h.update(len(ex.input_ids).to_bytes(8, "little"))
        h.update(ids)
        h.update(lab)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of the token -> id map (added tokens included) and the special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    special = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    blob = json.dumps({"vocab": vocab, "special": special, "len": len(tokenizer)}, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _rows_per_example(examples: Sequence[Any]) -> List[int]:
    from .data import IGNORE_INDEX

    return [sum(1 for y in ex.labels[1:] if y != IGNORE_INDEX) for ex in examples]


def _atomic_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _head_transform_of(cfg_obj) -> Tuple[Optional[float], Optional[float]]:
    scale = getattr(cfg_obj, "logit_scale", None)
    cap = getattr(cfg_obj, "final_logit_softcapping", None)
    return (None if scale in (None, 1, 1.0) else float(scale)), (None if cap is None else float(cap))


def _check_head(teacher: nn.Module):
    from . import models as M

    head = M.output_head(teacher)
    bad = [a for a in _UNSUPPORTED_HEAD_ATTRS if getattr(teacher.config, a, None) not in (None, 1, 1.0)]
    if bad:
        raise ConfigError(f"amid-distill cache-teacher: the teacher ({type(teacher).__name__}) transforms its logits "
                          f"with {bad}, which the cache cannot reproduce; expected a plain linear head with at most "
                          "logit_scale / final_logit_softcapping")
    return head


def _apply_head(h: Tensor, w: Tensor, b: Optional[Tensor], transform) -> Tensor:
    logits = torch.nn.functional.linear(h, w, b)
    scale, cap = transform
    if scale is not None:
        logits = logits * scale
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def topk_rows(logits: Tensor, k: int, value_dtype: torch.dtype) -> Dict[str, Tensor]:
    """Top-k teacher log-probabilities of logit rows [N, V]: ``logprobs`` [N, k] (``value_dtype``),
    ``indices`` [N, k] int32 and ``tail_logmass`` [N] float32 = log Σ_{v ∉ top-k} p_v (-inf for k = V)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    vals, idx = torch.topk(lp, k, dim=-1)
    rest = lp.scatter(1, idx, float("-inf"))
    tail = torch.logsumexp(rest, dim=-1)
    return {"logprobs": vals.to(value_dtype), "indices": idx.to(torch.int32), "tail_logmass": tail.float()}


# ------------------------------------------------------------------------------------------------
# Writing

def _load_teacher(cfg: DistillConfig, teacher, tokenizer):
    from . import models as M

    t_dtype = getattr(torch, cfg.teacher_torch_dtype)
    if teacher is None:
        t_path, t_gguf = M.resolve_model_path(cfg.teacher, cfg.teacher_gguf_file)
        tokenizer = M.load_tokenizer(t_path, t_gguf)
        attn = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
        teacher = M.load_causal_lm(t_path, t_gguf, role="teacher", dtype=t_dtype,
                                   extra={**attn, **(cfg.teacher_load_kwargs or {})})
    elif next(teacher.parameters()).dtype != t_dtype and not getattr(teacher, "hf_device_map", None):
        teacher = teacher.to(t_dtype)
    if tokenizer is None:
        raise ValueError("amid-distill cache-teacher: a teacher model object needs its tokenizer (tokenizer=...)")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, tokenizer


def _encode_splits(cfg: DistillConfig, tokenizer) -> Dict[str, list]:
    from .data import encode_records, load_records

    out = {}
    for name, path in (("train", cfg.train_file), ("validation", cfg.validation_file), ("test", cfg.test_file)):
        if path is not None:
            out[name] = encode_records(tokenizer, load_records(path, split=name), system_prompt=cfg.system_prompt,
                                       max_length=cfg.max_length, source=path)
    return out


def _plan_shards(rows: List[int], bytes_per_row: int, shard_bytes: int) -> List[Tuple[int, int]]:
    """Consecutive example ranges [a, b) of about ``shard_bytes`` each (deterministic from the data)."""
    plan, a, acc = [], 0, 0
    for i, r in enumerate(rows):
        acc += r * bytes_per_row
        if acc >= shard_bytes:
            plan.append((a, i + 1))
            a, acc = i + 1, 0
    if a < len(rows):
        plan.append((a, len(rows)))
    return plan


def cache_teacher(config: DistillConfig, cache_dir: Optional[str] = None, *, mode: str = "hidden",
                  dtype: Optional[str] = None, k: int = 64, shard_mb: float = 256.0, batch_size: Optional[int] = None,
                  teacher: Optional[nn.Module] = None, tokenizer=None, progress: Optional[bool] = None,
                  _stop_after_shards: Optional[int] = None) -> Dict[str, Any]:
    """Run the teacher once over the config's train / validation / test data and write a cache.

    Args:
        config: the training config (data files, max_length, system_prompt, teacher, teacher_dtype,
            device, bf16, student_num_layers / student_layers).
        cache_dir: the cache directory (default: ``config.teacher_cache``).
        mode: ``'hidden'`` (exact) or ``'topk'``.
        dtype: storage dtype: hidden mode float32 / bfloat16 / float16 (default: the hidden states'
            own dtype); topk mode float16 (default) or bfloat16 for the log-probabilities.
        k: top-k size (topk mode).
        shard_mb: target shard size in MB.
        batch_size: sequences per teacher forward (default: ``micro_batch_size``).
        teacher, tokenizer: model objects instead of ``config.teacher`` (tests).
        progress: progress bar (default: ``config.progress``).

    Returns a summary dict (tokens, bytes, bytes per token, seconds, tokens per second, shards written).
    Rerunning with the same arguments continues an interrupted run; a finished cache is left as is.
    """
    from . import models as M
    from .data import IGNORE_INDEX, collate_train

    cfg = config
    cache_dir = cache_dir or cfg.teacher_cache
    if not cache_dir:
        raise ConfigError("amid-distill cache-teacher: expected a cache directory (--teacher-cache DIR), but got none")
    if mode not in MODES:
        raise ConfigError(f"amid-distill cache-teacher: --mode: expected one of {', '.join(MODES)}, but got {mode!r}")
    if dtype is not None and dtype not in _STORE_DTYPES:
        raise ConfigError(f"amid-distill cache-teacher: --dtype: expected one of {', '.join(_STORE_DTYPES)}, but got "
                          f"{dtype!r}")
    if mode == "topk" and dtype is not None and _STORE_DTYPES[dtype] == torch.float32:
        raise ConfigError("amid-distill cache-teacher: --dtype: the topk mode stores log-probabilities in float16 or "
                          "bfloat16, but got float32")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"amid-distill cache-teacher: --k: expected an integer >= 1, but got {k!r}")
    if not (shard_mb > 0 and math.isfinite(shard_mb)):
        raise ConfigError(f"amid-distill cache-teacher: --shard-mb: expected a number > 0, but got {shard_mb!r}")
    cfg.validate(teacher_given=teacher is not None)
    if teacher is None and not cfg.teacher:
        raise ConfigError("amid-distill cache-teacher: config field 'teacher': expected the teacher to run (a model "
                          "directory, Hub id or 'smollm2'), but got none")
    progress = cfg.progress if progress is None else progress
    os.makedirs(cache_dir, exist_ok=True)
    t0 = time.perf_counter()

    teacher, tokenizer = _load_teacher(cfg, teacher, tokenizer)
    want_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device(cfg.device if ":" in cfg.device else ("cuda" if want_cuda else "cpu"))
    if not getattr(teacher, "hf_device_map", None):
        teacher = teacher.to(device)
    use_bf16 = cfg.bf16 == "true" or (cfg.bf16 == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    head = _check_head(teacher)
    transform = _head_transform_of(teacher.config)
    splits = _encode_splits(cfg, tokenizer)
    n_tok = len(tokenizer)
    hidden_size = head.weight.shape[1]
    v_teacher = head.weight.shape[0]
    if mode == "topk" and k > n_tok:
        raise ConfigError(f"amid-distill cache-teacher: --k: expected at most the vocabulary's {n_tok} tokens, but got "
                          f"{k}")

    t_dtype_name = _DTYPE_NAME.get(next(teacher.parameters()).dtype, str(next(teacher.parameters()).dtype))
    if mode == "hidden":
        store = _STORE_DTYPES[dtype] if dtype else None  # None: the hidden states' own dtype
        bytes_per_row = hidden_size * (store.itemsize if store is not None else 4)
    else:
        store = _STORE_DTYPES[dtype] if dtype else torch.float16
        bytes_per_row = k * (store.itemsize + 4) + 4
    identity = {
        "format": FORMAT, "mode": mode,
        "store_dtype": _DTYPE_NAME[store] if store is not None else "auto",
        "k": k if mode == "topk" else None,
        "teacher": {"name": cfg.teacher if cfg.teacher else type(teacher).__name__, "class": type(teacher).__name__,
                    "gguf_file": cfg.teacher_gguf_file, "dtype": t_dtype_name,
                    "revision": getattr(teacher.config, "_commit_hash", None),
                    "weights_sha256": weights_fingerprint(teacher), "bf16_autocast": use_bf16},
        "tokenizer": {"sha256": tokenizer_fingerprint(tokenizer), "len": n_tok},
        "head": {"vocab_rows": v_teacher, "hidden_size": hidden_size, "bias": head.bias is not None,
                 "logit_scale": transform[0], "final_logit_softcapping": transform[1]},
        "data": {"max_length": cfg.max_length, "system_prompt": cfg.system_prompt,
                 "splits": {name: {"num_examples": len(ex), "fingerprint": data_fingerprint(ex),
                                   "rows": sum(_rows_per_example(ex))} for name, ex in splits.items()}},
        "student_init": ({"student_num_layers": cfg.student_num_layers, "student_layers": cfg.student_layers}
                         if cfg.student is None else None),
        "shard_mb": shard_mb,
    }
    index_path = os.path.join(cache_dir, INDEX_FILE)
    prog_path = os.path.join(cache_dir, PROGRESS_FILE)
    done: Dict[str, Dict[str, Any]] = {}
    for path in (index_path, prog_path):
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    old = json.load(f)
            except (OSError, ValueError) as e:
                raise ConfigError(f"amid-distill cache-teacher: {path} is unreadable ({e}); delete the directory "
                                  f"'{cache_dir}' or use another") from None
            if old.get("identity") != identity:
                diff = sorted(key for key in set(identity) | set(old.get("identity") or {})
                              if (old.get("identity") or {}).get(key) != identity.get(key))
                raise ConfigError(f"amid-distill cache-teacher: '{cache_dir}' holds a cache of another teacher, data or "
                                  f"options (differs in {diff}); expected an empty directory or one written by this "
                                  "same command (delete it to rebuild)")
            done = {s["file"]: s for s in old.get("shards", [])}
            break

    # Tokenizer and (config without a student) the student built from the teacher's layers.
    tok_dir = os.path.join(cache_dir, TOKENIZER_DIR)
    if not os.path.isdir(tok_dir):
        tmp = tok_dir + f".tmp{os.getpid()}"
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, tok_dir)
    if cfg.student is None:
        s_dir = os.path.join(cache_dir, STUDENT_DIR)
        if not os.path.isdir(s_dir):
            student = M.build_student_from_teacher(teacher, cfg.student_num_layers, cfg.student_layers)
            if student.dtype != torch.float32:
                student = student.float()
            tmp = s_dir + f".tmp{os.getpid()}"
            student.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, s_dir)
            del student
    if mode == "hidden" and not os.path.isfile(os.path.join(cache_dir, HEAD_FILE)):
        from safetensors.torch import save_file

        tensors = {"weight": head.weight.detach().to("cpu").contiguous()}
        if head.bias is not None:
            tensors["bias"] = head.bias.detach().to("cpu").contiguous()
        tmp = os.path.join(cache_dir, f".{HEAD_FILE}.tmp{os.getpid()}")
        try:
            save_file(tensors, tmp, metadata={"format": FORMAT})
            os.replace(tmp, os.path.join(cache_dir, HEAD_FILE))
        except OSError as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise CacheError(f"amid-distill cache-teacher: writing {os.path.join(cache_dir, HEAD_FILE)} failed "
                             f"({e.strerror or e}); rerun the same command to continue") from None

    # Shards.
    plans = {name: _plan_shards(_rows_per_example(ex), bytes_per_row, int(shard_mb * 2**20))
             for name, ex in splits.items()}
    total_rows = sum(identity["data"]["splits"][n]["rows"] for n in splits)
    bs = batch_size or cfg.micro_batch_size
    shards: List[Dict[str, Any]] = []
    todo_rows = 0
    for name, plan in plans.items():
        for j, (a, b) in enumerate(plan):
            fname = f"{name}-{j:05d}-of-{len(plan):05d}.safetensors"
            rows = sum(_rows_per_example(splits[name][a:b]))
            shards.append({"file": fname, "split": name, "first_example": a, "num_examples": b - a, "rows": rows})
            prev = done.get(fname)
            if not (prev and os.path.isfile(os.path.join(cache_dir, fname))
                    and os.path.getsize(os.path.join(cache_dir, fname)) == prev.get("bytes")):
                todo_rows += rows
    pbar = None
    if progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=total_rows, initial=total_rows - todo_rows, desc="cache-teacher", unit="tok",
                    dynamic_ncols=True, file=sys.stderr)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if use_bf16
                else contextlib.nullcontext())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    written, rows_written, t_run = 0, 0, time.perf_counter()
    from safetensors.torch import save_file

    try:
        for sh in shards:
            fpath = os.path.join(cache_dir, sh["file"])
            prev = done.get(sh["file"])
            if prev and os.path.isfile(fpath) and os.path.getsize(fpath) == prev.get("bytes"):
                sh.update(bytes=prev["bytes"], sha256=prev["sha256"])
                continue
            if _stop_after_shards is not None and written >= _stop_after_shards:
                raise KeyboardInterrupt("stopped (test)")
            exs = splits[sh["split"]][sh["first_example"]:sh["first_example"] + sh["num_examples"]]
            parts: Dict[str, List[Tensor]] = {}
            counts: List[int] = []
            for i in range(0, len(exs), bs):
                batch = collate_train([{"input_ids": e.input_ids, "labels": e.labels} for e in exs[i:i + bs]], pad_id)
                batch = {kk: v.to(device) for kk, v in batch.items()}
                row_mask = batch["labels"][:, 1:] != IGNORE_INDEX
                with torch.no_grad(), autocast:
                    out = teacher.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                             use_cache=False)
                h = out.last_hidden_state[:, :-1][row_mask]
                counts += row_mask.sum(1).tolist()
                if mode == "hidden":
                    parts.setdefault("hidden", []).append((h if store is None else h.to(store)).to("cpu"))
                else:
                    with torch.no_grad():
                        w = head.weight[:n_tok]
                        bvec = head.bias[:n_tok] if head.bias is not None else None
                        for c in range(0, h.shape[0], 256):
                            logits = _apply_head(h[c:c + 256].to(w.dtype), w, bvec, transform)
                            for key, val in topk_rows(logits, k, store).items():
                                parts.setdefault(key, []).append(val.to("cpu"))
                if pbar is not None:
                    pbar.update(int(row_mask.sum()))
            tensors = {key: torch.cat(v).contiguous() for key, v in parts.items()}
            if mode == "hidden" and "hidden" not in tensors:
                tensors["hidden"] = torch.zeros((0, hidden_size))
            offsets = torch.zeros(len(exs) + 1, dtype=torch.int64)
            offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
            tensors["offsets"] = offsets
            tmp = os.path.join(cache_dir, f".{sh['file']}.tmp{os.getpid()}")
            try:
                save_file(tensors, tmp, metadata={"format": FORMAT})  # one key: the header is then byte-identical
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                sh["bytes"] = os.path.getsize(tmp)
                sh["sha256"] = sha256_file(tmp)
                os.replace(tmp, fpath)
            except OSError as e:  # e.g. a full disk
                raise CacheError(f"amid-distill cache-teacher: writing {fpath} failed ({e.strerror or e}); the "
                                 f"{len(done)} finished shards are kept: rerun the same command to continue") from None
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)  # e.g. a full disk: no half shard is left behind
            done[sh["file"]] = dict(sh)
            _atomic_json(prog_path, {"identity": identity, "shards": list(done.values())})
            written += 1
            rows_written += sh["rows"]
    finally:
        if pbar is not None:
            pbar.close()
    seconds = time.perf_counter() - t_run
    manifest = {"identity": identity, "shards": shards, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _atomic_json(index_path, manifest)
    if os.path.exists(prog_path):
        os.remove(prog_path)
    total_bytes = sum(s["bytes"] for s in shards)
    summary = {"cache_dir": cache_dir, "mode": mode, "tokens": total_rows, "bytes": total_bytes,
               "bytes_per_token": total_bytes / max(1, total_rows), "shards": len(shards), "shards_written": written,
               "tokens_written": rows_written, "seconds": seconds,
               "tokens_per_second": rows_written / seconds if seconds > 0 else 0.0,
               "total_seconds": time.perf_counter() - t0}
    return summary


# ------------------------------------------------------------------------------------------------
# Reading

class _StandInHead(nn.Module):
    """What the trainer needs of a teacher when its outputs come from a cache: the head and its config."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], identity: Dict[str, Any], eos) -> None:
        super().__init__()
        self.lm_head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype,
                                 device="meta")
        self.lm_head.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            self.lm_head.bias = nn.Parameter(bias, requires_grad=False)
        h = identity["head"]
        from types import SimpleNamespace

        self.config = SimpleNamespace(logit_scale=h["logit_scale"], final_logit_softcapping=h["final_logit_softcapping"],
                                      num_hidden_layers=0)
        self.generation_config = SimpleNamespace(eos_token_id=eos)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head


class OfflineTeacher:
    """A teacher cache opened for training: per-example teacher rows by (split, index), memory-mapped.

    ``OfflineTeacher.open(dir)`` checks the manifest and every shard's presence and size; each shard's
    SHA-256 is checked the first time it is read (each rank reads only the shards of its samples).
    """

    def __init__(self, cache_dir: str, manifest: Dict[str, Any]) -> None:
        self.dir = cache_dir
        self.manifest = manifest
        self.identity = manifest["identity"]
        self.mode = self.identity["mode"]
        self._by_split: Dict[str, List[Dict[str, Any]]] = {}
        for sh in manifest["shards"]:
            self._by_split.setdefault(sh["split"], []).append(sh)
        for lst in self._by_split.values():
            lst.sort(key=lambda s: s["first_example"])
        self._starts = {k: [s["first_example"] for s in v] for k, v in self._by_split.items()}
        self._open: Dict[str, Tuple[Any, Tensor]] = {}

    @classmethod
    def open(cls, cache_dir: str) -> "OfflineTeacher":
        tag = _tag(cache_dir)
        if not os.path.isdir(cache_dir):
            raise CacheError(f"{tag}: the directory does not exist (build it with amid-distill cache-teacher)")
        index = os.path.join(cache_dir, INDEX_FILE)
        if not os.path.isfile(index):
            what = (" (an interrupted cache-teacher run: rerun the same command to finish it)"
                    if os.path.isfile(os.path.join(cache_dir, PROGRESS_FILE)) else "")
            raise CacheError(f"{tag}: expected a complete teacher cache, but {index} is missing{what}")
        try:
            with open(index, encoding="utf-8") as f:
                manifest = json.load(f)
            ident = manifest["identity"]
            if ident.get("format") != FORMAT:
                raise ValueError(f"format {ident.get('format')!r}, expected {FORMAT!r}")
            shards = manifest["shards"]
            for s in shards:
                str(s["file"]), int(s["bytes"]), str(s["sha256"]), int(s["first_example"]), int(s["num_examples"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CacheError(f"{tag}: {index} is unreadable ({type(e).__name__}: {e})") from None
        files = ([HEAD_FILE] if ident["mode"] == "hidden" else []) + [s["file"] for s in shards]
        for name in files:
            path = os.path.join(cache_dir, name)
            if not os.path.isfile(path):
                raise CacheError(f"{tag}: the shard {path} is missing")
        for s in shards:
            path = os.path.join(cache_dir, s["file"])
            size = os.path.getsize(path)
            if size != int(s["bytes"]):
                raise CacheError(f"{tag}: the shard {path} has {size} bytes, expected {s['bytes']} (truncated?)")
        return cls(cache_dir, manifest)

    # -- identity checks -------------------------------------------------------------------------
    @property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(os.path.join(self.dir, TOKENIZER_DIR))

    def check_tokenizer(self, tokenizer) -> None:
        want = self.identity["tokenizer"]["sha256"]
        got = tokenizer_fingerprint(tokenizer)
        if got != want:
            raise CacheError(f"{_tag(self.dir)}: field 'tokenizer' differs: the cache was built with another tokenizer "
                             f"({self.identity['tokenizer']['len']} tokens, fingerprint {want[:12]}), but this run's has "
                             f"{len(tokenizer)} tokens, fingerprint {got[:12]}; rebuild the cache with this tokenizer")

    def check_config(self, cfg: DistillConfig) -> None:
        d = self.identity["data"]
        for field in ("max_length", "system_prompt"):
            if d[field] != getattr(cfg, field):
                raise CacheError(f"{_tag(self.dir)}: field '{field}' differs: the cache was built with {d[field]!r}, "
                                 f"but this run has {getattr(cfg, field)!r}")
        if cfg.student_gen:
            raise CacheError(f"{_tag(self.dir)}: student_gen needs a live teacher (the teacher scores the student's own "
                             "samples, which no cache holds); expected student_gen false with a teacher cache")
        t = self.identity["teacher"]
        if cfg.teacher and t["name"] != cfg.teacher:
            raise CacheError(f"{_tag(self.dir)}: field 'teacher' differs: the cache holds the outputs of {t['name']!r}, "
                             f"but this run names {cfg.teacher!r}")
        if self.mode == "topk" and cfg.fused_linear:
            raise CacheError(f"{_tag(self.dir)}: a 'topk' cache holds no teacher head, so the fused head + loss cannot "
                             "run; expected fused_linear false (the student's logits are formed chunk-free)")
        if self.mode == "topk" and cfg.topk_tail == "bucket" and cfg.temperature != 1.0:
            raise CacheError(f"{_tag(self.dir)}: topk_tail 'bucket' needs temperature 1 (the teacher's tail mass at "
                             f"another temperature is not in the cache), but got temperature {cfg.temperature}; use "
                             "topk_tail 'renorm' or a 'hidden' cache")
        self.tail = cfg.topk_tail

    def check_split(self, name: str, examples: Sequence[Any], field: str) -> None:
        splits = self.identity["data"]["splits"]
        if name not in splits:
            raise CacheError(f"{_tag(self.dir)}: field '{field}': the cache has no {name} split (it holds "
                             f"{sorted(splits)}); rebuild it with this config")
        want = splits[name]
        got = data_fingerprint(examples)
        if got != want["fingerprint"]:
            raise CacheError(f"{_tag(self.dir)}: field '{field}' differs: the cache's {name} split was built from other "
                             f"data ({want['num_examples']} examples, fingerprint {want['fingerprint'][:12]}), but this "
                             f"run's has {len(examples)} examples, fingerprint {got[:12]}; rebuild the cache")

    def check_student(self, cfg: DistillConfig) -> Optional[str]:
        """The cached initial student's directory for a config without ``student`` (checked against it)."""
        si = self.identity.get("student_init")
        if si is None:
            raise CacheError(f"{_tag(self.dir)}: field 'student': the cache holds no initial student (it was built for "
                             "a config with a student directory); expected a 'student'")
        for field in ("student_num_layers", "student_layers"):
            if si[field] != getattr(cfg, field):
                raise CacheError(f"{_tag(self.dir)}: field '{field}' differs: the cache's initial student was built "
                                 f"with {si[field]!r}, but this run has {getattr(cfg, field)!r}")
        return os.path.join(self.dir, STUDENT_DIR)

    def stand_in(self, eos=None) -> nn.Module:
        """A module with the teacher's output head (``get_output_embeddings``) and its logit transform
        (topk mode: a [V, 1] zero placeholder of the head, only its number of rows is used)."""
        from safetensors.torch import load_file

        if self.mode == "topk":
            v = self.identity["head"]["vocab_rows"]
            return _StandInHead(torch.zeros(v, 1, dtype=getattr(torch, self.identity["teacher"]["dtype"])), None,
                                self.identity, eos)
        path = os.path.join(self.dir, HEAD_FILE)
        try:
            t = load_file(path)
        except Exception as e:  # noqa: BLE001 - SafetensorError on a damaged file
            raise CacheError(f"{_tag(self.dir)}: the head file {path} is unreadable ({type(e).__name__}: {e})") from None
        return _StandInHead(t["weight"], t.get("bias"), self.identity, eos)

    # -- rows ----------------------------------------------------------------------------------
    def _shard(self, split: str, i: int) -> Tuple[Dict[str, Any], Any, Tensor]:
        if split not in self._by_split:
            raise CacheError(f"{_tag(self.dir)}: the cache has no {split} split")
        j = bisect.bisect_right(self._starts[split], i) - 1
        sh = self._by_split[split][j]
        if not (0 <= j and i < sh["first_example"] + sh["num_examples"]):
            raise CacheError(f"{_tag(self.dir)}: example {i} of the {split} split is not in the cache")
        if sh["file"] not in self._open:
            from safetensors import safe_open

            path = os.path.join(self.dir, sh["file"])
            if not os.path.isfile(path):
                raise CacheError(f"{_tag(self.dir)}: the shard {path} is missing")
            digest = sha256_file(path)
            if digest != sh["sha256"]:
                raise CacheError(f"{_tag(self.dir)}: the shard {path} does not match its SHA-256 in {INDEX_FILE} "
                                 "(corrupt or replaced); rebuild the cache")
            try:
                f = safe_open(path, framework="pt")
                offsets = f.get_tensor("offsets")
            except Exception as e:  # noqa: BLE001
                raise CacheError(f"{_tag(self.dir)}: the shard {path} is unreadable ({type(e).__name__}: {e})") from None
            self._open[sh["file"]] = (f, offsets)
        f, offsets = self._open[sh["file"]]
        return sh, f, offsets

    def rows(self, keys: Sequence[Tuple[str, int]], name: str = "hidden") -> Tensor:
        """The cached rows (``name``: 'hidden', 'logprobs', 'indices', 'tail_logmass') of the examples
        ``keys`` = [(split, index), ...], concatenated in order."""
        out = []
        for split, i in keys:
            sh, f, offsets = self._shard(split, int(i))
            loc = int(i) - sh["first_example"]
            a, b = int(offsets[loc]), int(offsets[loc + 1])
            out.append(f.get_slice(name)[a:b])
        return torch.cat(out) if out else torch.zeros(0)

    def hidden(self, keys: Optional[Sequence[Tuple[str, int]]], device: torch.device) -> Tensor:
        if keys is None:
            raise CacheError(f"{_tag(self.dir)}: a batch without cached teacher outputs (student-generated); expected "
                             "student_gen false with a teacher cache")
        if self.mode == "topk":
            out = {name: self.rows(keys, name).to(device) for name in ("logprobs", "indices", "tail_logmass")}
            out["tail"] = getattr(self, "tail", "bucket")
            return out
        return self.rows(keys, "hidden").to(device)

    @staticmethod
    def dense_logits(teacher: Dict[str, Any], vocab: int) -> Tensor:
        """[N, V] float32 teacher logits of a top-k batch: the top-k log-probabilities, -inf elsewhere
        (the renormalised teacher; for evaluation)."""
        from ..topk import renorm_teacher_logits

        return renorm_teacher_logits(teacher["logprobs"], teacher["indices"], vocab, torch.float32)


def topk_loss(s: Tensor, teacher: Dict[str, Any], labels: Tensor, opts: Dict[str, Any], normalizer: Tensor,
              kd_weight: float, ce_weight: float) -> Dict[str, Optional[Tensor]]:
    """The trainer's loss (StudentEngine) against a top-k teacher batch: kd_weight · amid_loss_topk +
    ce_weight · CE, both normalised like the dense path."""
    import torch.nn.functional as F

    from ..topk import amid_loss_topk

    kd = None
    if kd_weight > 0:
        tl = teacher["tail_logmass"] if teacher["tail"] == "bucket" else None
        kd = amid_loss_topk(s, teacher["logprobs"], teacher["indices"], None, tail=teacher["tail"],
                            teacher_tail_logmass=tl, reduction="mean", normalizer=normalizer, validate=False, **opts)
    ce = (F.cross_entropy(s.float(), labels, reduction="sum") / normalizer) if ce_weight > 0 else None
    loss = 0.0
    if kd is not None:
        loss = loss + kd_weight * kd
    if ce is not None:
        loss = loss + ce_weight * ce
    if kd is None and ce is None:
        loss = s.sum() * 0.0
    t_tail, s_tail = tail_shares(s, teacher)
    return {"loss": loss, "kd": kd, "ce": ce, "tail_teacher": t_tail.sum() / normalizer,
            "tail_student": s_tail.sum() / normalizer}


@torch.no_grad()
def tail_shares(s: Tensor, teacher: Dict[str, Any]) -> Tuple[Tensor, Tensor]:
    """Per-row tail shares of a top-k batch (float32 [N], for the trainer's log): the teacher's mass
    outside its top-k (the cache's ``tail_logmass``) and the student's mass on those same tokens,
    1 − Σ_{v ∈ top-k} softmax(s)_v, as −expm1(LSE(s_I) − LSE(s)). One pass over the [N, V] logits."""
    x = s.detach()
    lse = torch.logsumexp(x.float(), dim=-1)
    top = torch.logsumexp(x.gather(1, teacher["indices"].long()).float(), dim=-1)
    s_tail = (-torch.expm1(torch.clamp(top - lse, max=0.0))).clamp_min(0.0)
    t_tail = teacher["tail_logmass"].float().exp()
    return t_tail, s_tail


def open_for_training(cfg: DistillConfig, teacher, tokenizer, student, *, resume: bool,
                      student_extra: Optional[Dict[str, Any]] = None):
    """For the trainer (``teacher_cache`` set): ``(offline, stand-in teacher, tokenizer, student)``.

    Opens and checks the cache (manifest, shard sizes, options, tokenizer); the tokenizer is the
    cache's own unless given; without a ``student`` in the config (and no student object, no resume)
    the student is the one cache-teacher built from the teacher's layers.
    """
    from . import models as M

    if teacher is not None:
        raise ConfigError("amid-distill: config field 'teacher_cache': a teacher model object was passed too; expected "
                          "either a live teacher or a teacher cache")
    offline = OfflineTeacher.open(cfg.teacher_cache)
    offline.check_config(cfg)
    if tokenizer is None:
        if cfg.teacher:  # the config names the teacher: its tokenizer must be the cache's
            t_path, t_gguf = M.resolve_model_path(cfg.teacher, cfg.teacher_gguf_file)
            tokenizer = M.load_tokenizer(t_path, t_gguf)
        else:
            tokenizer = offline.tokenizer
    offline.check_tokenizer(tokenizer)
    if student is None and cfg.student is None and not resume:
        s_dir = offline.check_student(cfg)
        student = M.load_causal_lm(s_dir, role="student (built by cache-teacher)", extra=student_extra or {})
    eos = tokenizer.eos_token_id
    return offline, offline.stand_in(eos), tokenizer, student


# ------------------------------------------------------------------------------------------------
# CLI: amid-distill cache-teacher

def main(argv: Optional[List[str]] = None) -> int:
    """``amid-distill cache-teacher [cache flags] [any amid-distill config flags]``."""
    p = argparse.ArgumentParser(prog="amid-distill cache-teacher", add_help=False,
                                description="Run the teacher once over the config's data and write a teacher cache "
                                            "(then train with --teacher-cache DIR).")
    p.add_argument("--mode", default="hidden", choices=list(MODES),
                   help="hidden: exact final hidden states + head (default); topk: top-k log-probabilities")
    p.add_argument("--dtype", default=None, choices=list(_STORE_DTYPES),
                   help="storage dtype (hidden: default the hidden states' own; topk: default float16)")
    p.add_argument("--k", type=int, default=64, help="top-k size (mode topk)")
    p.add_argument("--shard-mb", "--shard_mb", type=float, default=256.0, help="target shard size in MB")
    p.add_argument("--batch-size", "--batch_size", type=int, default=None,
                   help="sequences per teacher forward (default: micro_batch_size)")
    p.add_argument("-h", "--help", action="store_true")
    args, rest = p.parse_known_args(argv)
    if args.help:
        p.print_help()
        print("\nAll amid-distill config flags are accepted too (--config, --demo, --teacher, --train-file, ...); "
              "the cache directory is --teacher-cache DIR.")
        return 0
    from .cli import resolve_config

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        cfg = resolve_config(rest)
        if not cfg.teacher_cache:
            raise ConfigError("amid-distill cache-teacher: expected the cache directory (--teacher-cache DIR), but got "
                              "none")
        summary = cache_teacher(cfg, mode=args.mode, dtype=args.dtype, k=args.k, shard_mb=args.shard_mb,
                                batch_size=args.batch_size)
    except ValueError as e:
        if not str(e).startswith("amid-distill"):
            raise
        print(str(e), file=sys.stderr)
        return 2
    print(f"[amid-distill] teacher cache ({summary['mode']}): {summary['cache_dir']}\n"
          f"[amid-distill] {summary['tokens']} tokens, {summary['bytes'] / 2**20:.1f} MiB in {summary['shards']} shards "
          f"({summary['bytes_per_token']:.0f} bytes/token); wrote {summary['shards_written']} shards, "
          f"{summary['tokens_written']} tokens in {summary['seconds']:.1f} s "
          f"({summary['tokens_per_second']:.0f} tokens/s)", flush=True)
    return 0
