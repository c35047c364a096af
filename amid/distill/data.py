"""Data: JSONL / Parquet / Hub-dataset instruction records -> chat-templated token ids with masked
prompts, batches, sampler.

Records are ``{"prompt": ..., "response": ...}`` (optionally ``"system"`` and ``"answer"``) or
``{"messages": [{"role": ..., "content": ...}, ...]}`` whose last message is the assistant's answer.
The prompt is rendered with the tokenizer's chat template (``add_generation_prompt=True``) and
the answer is the rest of the rendered conversation, tokenized separately so that the prompt ids
used for generation are exactly the prefix of the training sequence. Prompt tokens get label -100.
"""
from __future__ import annotations

import json
import os
import random
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["Example", "load_records", "encode_records", "collate_train", "collate_prompts", "StepSampler",
           "IGNORE_INDEX"]

IGNORE_INDEX = -100
# Used when the tokenizer has no chat template (plain base models).
_FALLBACK_PROMPT = "{system}### Instruction:\n{prompt}\n\n### Response:\n"


@dataclass
class Example:
    """One tokenized record."""

    input_ids: List[int]
    labels: List[int]
    prompt_ids: List[int]
    reference: str
    answer: Optional[str] = None


def _fail(path: str, line: int, msg: str) -> ValueError:
    return ValueError(f"amid-distill: {path} line {line}: {msg}")


def _rows(path: str, split: str):
    """``(where, row)`` pairs of a data source: JSONL (``where`` = line number), Parquet, or a
    Hugging Face dataset id ``org/name`` (``org/name:split`` picks the split; default ``split``)."""
    if os.path.isfile(path) and path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"amid-distill: reading '{path}' needs pyarrow (pip install pyarrow)") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - ArrowInvalid etc. on a damaged file
            raise ValueError(f"amid-distill: '{path}' is not a readable Parquet file: "
                             f"{' '.join(str(e).split())[:300]}") from None
        for i, row in enumerate(rows, 1):
            yield f"row {i}", row
        return
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _fail(path, i, f"expected a JSON object, but the line is not valid JSON ({e})") from e
                yield f"line {i}", rec
        return
    from .config import is_dataset_id

    if not is_dataset_id(path):
        raise ValueError(f"amid-distill: the data file '{path}' does not exist")
    name, _, sp = path.partition(":")
    try:
        import datasets
    except ImportError:
        raise ValueError(f"amid-distill: '{path}' is not a local file, and Hub datasets need the datasets package "
                         "(pip install datasets)") from None
    try:
        ds = datasets.load_dataset(name, split=sp or split)
    except Exception as e:  # noqa: BLE001 - offline miss, unknown split, ...
        raise ValueError(f"amid-distill: the dataset '{path}' is neither a local file nor loadable with "
                         f"datasets.load_dataset (offline, only the local cache is read): "
                         f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    for i, row in enumerate(ds, 1):
        yield f"row {i}", row


def load_records(path: str, split: str = "train") -> List[Dict[str, Any]]:
    """Read and check a data source (JSONL, Parquet or a Hub dataset id); returns ``{"messages", "answer"}`` dicts.

    Rows are ``{prompt, response}`` (or TRL's ``{prompt, completion}``) or ``{messages}``.
    """
    out: List[Dict[str, Any]] = []
    for where, rec in _rows(path, split):
        if not isinstance(rec, dict):
            raise ValueError(f"amid-distill: {path} {where}: expected a JSON object, but got {type(rec).__name__}")
        fail = lambda msg: ValueError(f"amid-distill: {path} {where}: {msg}")  # noqa: E731
        if rec.get("messages") is not None:
            msgs = rec["messages"]
            if (not isinstance(msgs, list) or len(msgs) < 2
                    or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                               and isinstance(m.get("content"), str) for m in msgs)):
                raise fail("expected 'messages' to be a list of at least two {role, content} objects")
            if msgs[-1]["role"] != "assistant":
                raise fail(f"expected the last message to have role 'assistant', but got '{msgs[-1]['role']}'")
            messages = [{"role": m["role"], "content": m["content"]} for m in msgs]
        elif "prompt" in rec and ("response" in rec or "completion" in rec):
            response = rec["response"] if "response" in rec else rec["completion"]
            if not isinstance(rec["prompt"], str) or not isinstance(response, str):
                raise fail("expected 'prompt' and 'response' to be strings")
            messages = [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": response}]
            if isinstance(rec.get("system"), str):
                messages.insert(0, {"role": "system", "content": rec["system"]})
        else:
            raise fail(f"expected keys 'prompt' and 'response', or 'messages', but got {sorted(rec.keys())}")
        answer = rec.get("answer")
        out.append({"messages": messages, "answer": None if answer is None else str(answer)})
    if not out:
        raise ValueError(f"amid-distill: the data file '{path}' holds no records")
    return out


def _render(tokenizer, messages: List[Dict[str, str]], system_prompt: Optional[str]) -> Tuple[str, str, bool]:
    """(prompt text, completion text, whether the prompt text already holds special tokens)."""
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if full.startswith(prompt):
            return prompt, full[len(prompt):], True
        # A template that rewrites earlier turns: fall back to answer + EOS.
        return prompt, messages[-1]["content"] + (tokenizer.eos_token or ""), True
    system = ""
    turns = []
    for m in messages[:-1]:
        if m["role"] == "system":
            system = m["content"] + "\n\n"
        else:
            turns.append(m["content"])
    prompt = _FALLBACK_PROMPT.format(system=system, prompt="\n\n".join(turns))
    return prompt, messages[-1]["content"] + (tokenizer.eos_token or ""), False


def encode_records(tokenizer, records: Sequence[Dict[str, Any]], *, system_prompt: Optional[str] = None,
                   max_length: int = 256, source: str = "data") -> List[Example]:
    """Tokenize records; prompts are masked, over-long answers truncated, over-long prompts dropped (warning)."""
    out: List[Example] = []
    dropped = 0
    for rec in records:
        prompt_text, completion_text, templated = _render(tokenizer, rec["messages"], system_prompt)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=not templated)["input_ids"]
        completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
        if len(prompt_ids) >= max_length or not completion_ids:
            dropped += 1
            continue
        completion_ids = completion_ids[: max_length - len(prompt_ids)]
        ids = list(prompt_ids) + list(completion_ids)
        labels = [IGNORE_INDEX] * len(prompt_ids) + list(completion_ids)
        out.append(Example(ids, labels, list(prompt_ids), rec["messages"][-1]["content"], rec.get("answer")))
    if dropped:
        warnings.warn(f"amid-distill: {source}: dropped {dropped} of {len(records)} records whose prompt does not "
                      f"fit in max_length={max_length} tokens (or whose answer is empty)")
    if not out:
        raise ValueError(f"amid-distill: {source}: no record fits in max_length={max_length} tokens")
    return out


def collate_train(items: Sequence[Dict[str, List[int]]], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
    n = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    labels = torch.full((len(items), n), IGNORE_INDEX, dtype=torch.long)
    for i, it in enumerate(items):
        k = len(it["input_ids"])
        ids[i, :k] = torch.tensor(it["input_ids"], dtype=torch.long)
        mask[i, :k] = 1
        labels[i, :k] = torch.tensor(it["labels"], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_prompts(prompts: Sequence[List[int]], pad_id: int) -> Dict[str, torch.Tensor]:
    """Left-padded prompts for generation."""
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, n - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask}


class StepSampler:
    """Deterministic, resumable sampler that hands each rank its micro-batches for one optimizer step.

    Each epoch is a permutation of the examples (seeded by ``seed`` and the epoch). An optimizer
    step takes the next ``micro_batch_size * grad_accum_steps * world_size`` indices (the global
    batch); micro-batch ``m`` of rank ``r`` is slice ``m * world_size + r`` of it. So the same
    global batch is seen whatever the split between processes and accumulation steps. The
    incomplete tail of an epoch is dropped.
    """

    def __init__(self, n_examples: int, micro_batch_size: int, grad_accum_steps: int = 1, world_size: int = 1,
                 rank: int = 0, seed: int = 0) -> None:
        self.n = n_examples
        self.mbs, self.accum = micro_batch_size, grad_accum_steps
        self.world, self.rank = world_size, rank
        self.seed = seed
        self.global_batch = micro_batch_size * grad_accum_steps * world_size
        if self.n < self.global_batch:
            raise ValueError(f"amid-distill: the training set has {self.n} examples, fewer than one global batch "
                             f"(micro_batch_size {micro_batch_size} x grad_accum_steps {grad_accum_steps} x "
                             f"{world_size} processes = {self.global_batch})")
        self.steps_per_epoch = self.n // self.global_batch
        self.epoch = 0
        self.step_in_epoch = 0
        self._perm: Optional[List[int]] = None

    def _permutation(self) -> List[int]:
        if self._perm is None:
            rng = random.Random(self.seed * 1_000_003 + self.epoch)
            perm = list(range(self.n))
            rng.shuffle(perm)
            self._perm = perm
        return self._perm

    def next_step(self) -> List[List[int]]:
        """This rank's micro-batches (lists of example indices) for the next optimizer step."""
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
            self._perm = None
        perm = self._permutation()
        start = self.step_in_epoch * self.global_batch
        chunk = perm[start:start + self.global_batch]
        self.step_in_epoch += 1
        return [chunk[(m * self.world + self.rank) * self.mbs:(m * self.world + self.rank + 1) * self.mbs]
                for m in range(self.accum)]

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "seed": self.seed, "n": self.n,
                "global_batch": self.global_batch}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if state["n"] != self.n or state["global_batch"] != self.global_batch:
            raise ValueError(f"amid-distill: --resume: the checkpoint was written with {state['n']} training examples "
                             f"and a global batch of {state['global_batch']}, but this run has {self.n} and "
                             f"{self.global_batch}; resume with the same data and batch settings")
        self.epoch, self.step_in_epoch, self.seed = state["epoch"], state["step_in_epoch"], state["seed"]
        self._perm = None
