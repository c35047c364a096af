"""Evaluation metrics (ROUGE-L with ``rouge-score``, exact match, answer accuracy) and greedy generation."""
from __future__ import annotations

import re
import string
from typing import Dict, List, Optional, Sequence

import torch

from .data import collate_prompts

__all__ = ["normalize_text", "rouge_l", "exact_match", "answer_accuracy", "score_predictions", "generate_ids"]

_PUNCT = set(string.punctuation)


def normalize_text(s: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD / MiniLLM normalisation)."""
    s = s.lower()
    s = "".join(ch if ch not in _PUNCT else " " for ch in s)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


_SCORER = None


def _scorer():
    global _SCORER
    if _SCORER is None:
        try:
            from rouge_score import rouge_scorer
        except ImportError as e:  # pragma: no cover - rouge-score is in the distill extra
            raise ImportError("amid-distill: evaluation needs the 'rouge-score' package "
                              "(pip install rouge-score)") from e
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)  # as MiniLLM / DistiLLM score it
    return _SCORER


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure x 100 (``rouge-score``: lower case, alphanumeric tokens, Porter stemmer)."""
    if len(predictions) != len(references):
        raise ValueError(f"amid-distill: rouge_l: expected as many predictions as references, but got "
                         f"{len(predictions)} and {len(references)}")
    if not references:
        return 0.0
    sc = _scorer()
    return 100.0 * sum(sc.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / len(references)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Percentage of predictions equal to their reference after :func:`normalize_text`."""
    if not references:
        return 0.0
    hits = sum(normalize_text(p) == normalize_text(r) for p, r in zip(predictions, references))
    return 100.0 * hits / len(references)


def answer_accuracy(predictions: Sequence[str], answers: Sequence[Optional[str]]) -> Optional[float]:
    """Percentage of predictions that contain their short answer as whole normalised words (None without answers)."""
    pairs = [(p, a) for p, a in zip(predictions, answers) if a is not None]
    if not pairs:
        return None
    hits = 0
    for p, a in pairs:
        na = normalize_text(a)
        hits += bool(na) and f" {na} " in f" {normalize_text(p)} "
    return 100.0 * hits / len(pairs)


def score_predictions(predictions: Sequence[str], references: Sequence[str],
                      answers: Optional[Sequence[Optional[str]]] = None) -> Dict[str, Optional[float]]:
    """``{"rouge_l", "exact_match", "answer_acc"}`` for a list of generations."""
    out: Dict[str, Optional[float]] = {"rouge_l": rouge_l(predictions, references),
                                       "exact_match": exact_match(predictions, references)}
    out["answer_acc"] = answer_accuracy(predictions, answers) if answers is not None else None
    return out


@torch.no_grad()
def generate_ids(model, prompts: Sequence[List[int]], *, pad_id: int, eos_ids: Sequence[int], max_new_tokens: int,
                 device: torch.device, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, n_vocab: Optional[int] = None, synced_gpus: bool = False,
                 autocast=None) -> List[List[int]]:
    """New token ids for each prompt (one batch; greedy unless ``do_sample``), cut after the first EOS.

    Vocabulary rows at or past ``n_vocab`` (padding of the output head) are suppressed. The EOS
    token is kept at the end of a finished answer so that training on it teaches the model to stop.
    """
    from transformers import GenerationConfig

    batch = collate_prompts(prompts, pad_id)
    batch = {k: v.to(device) for k, v in batch.items()}
    v_model = model.get_output_embeddings().weight.shape[0]
    # Settings left unset would be filled from the model's generation_config (e.g. a repetition
    # penalty) and then from library defaults (top_k=50): set everything that shapes the output.
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=1, repetition_penalty=1.0,
        pad_token_id=pad_id, eos_token_id=list(eos_ids),
        suppress_tokens=list(range(n_vocab, v_model)) if n_vocab is not None and n_vocab < v_model else None,
        **sampling)
    ctx = autocast() if autocast is not None else torch.autocast("cpu", enabled=False)
    with ctx:
        out = model.generate(**batch, generation_config=gen_cfg, synced_gpus=synced_gpus)
    new = out[:, batch["input_ids"].shape[1]:].tolist()
    eos = set(eos_ids)
    result = []
    for seq in new:
        cut: List[int] = []
        for t in seq:
            cut.append(t)
            if t in eos:  # generate() pads finished rows after their EOS; unfinished rows have no padding
                break
        result.append(cut)
    return result
