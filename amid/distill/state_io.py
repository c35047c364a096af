"""Trainer state without pickle: JSON for the structure, safetensors for the tensors.

``save_state(obj, "trainer_state.json", "trainer_state.safetensors")`` writes nested dicts, lists,
tuples, numbers, strings, ``None``, torch tensors and numpy arrays (optimizer, scheduler, RNG and
buffer states); ``load_state`` gives the same structure back (tuples as tuples, integer dict keys
as integers, arrays with their dtype), so ``random.setstate`` / ``np.random.set_state`` /
``optimizer.load_state_dict`` take it as they would the pickled original. Nothing is unpickled on
resume, so a checkpoint from elsewhere cannot run code.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Optional

import numpy as np
import torch

__all__ = ["save_state", "load_state", "encode", "decode", "sha256_file"]

_T, _A, _TUP, _ITEMS = "__tensor__", "__ndarray__", "__tuple__", "__items__"


def sha256_file(path: str) -> str:
    """SHA-256 of a file's bytes (checkpoint and teacher-cache manifests)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def encode(x: Any, tensors: Dict[str, torch.Tensor], where: str = "state") -> Any:
    """``x`` as JSON-able data; its tensors go into ``tensors`` (referenced by key)."""
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, (int, float)):
        return x
    if isinstance(x, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = x.detach().to("cpu").contiguous().clone()
        return {_T: key}
    if isinstance(x, np.ndarray):
        key = f"t{len(tensors)}"
        arr = np.ascontiguousarray(x)
        # Stored as int64 / float64, the dtype kept aside (safetensors lacks some numpy dtypes).
        wide = arr.astype(np.float64 if arr.dtype.kind == "f" else np.int64)
        tensors[key] = torch.from_numpy(wide.copy())
        return {_A: key, "dtype": str(arr.dtype)}
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, tuple):
        return {_TUP: [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(x)]}
    if isinstance(x, list):
        return [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in x):
            return {k: encode(v, tensors, f"{where}.{k}") for k, v in x.items()}
        return {_ITEMS: [[encode(k, tensors, where), encode(v, tensors, f"{where}[{k!r}]")] for k, v in x.items()]}
    raise TypeError(f"amid-distill: cannot store {where} of type {type(x).__name__} in a checkpoint")


def decode(x: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`encode`."""
    if isinstance(x, list):
        return [decode(v, tensors) for v in x]
    if isinstance(x, dict):
        if _T in x:
            return tensors[x[_T]]
        if _A in x:
            return tensors[x[_A]].numpy().astype(np.dtype(x["dtype"]))
        if _TUP in x:
            return tuple(decode(v, tensors) for v in x[_TUP])
        if _ITEMS in x:
            return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in x[_ITEMS]}
        return {k: decode(v, tensors) for k, v in x.items()}
    return x


def _hashable(k: Any) -> Any:
    return tuple(_hashable(v) for v in k) if isinstance(k, (list, tuple)) else k


def save_state(obj: Any, json_path: str, tensors_path: str, *, extra: Optional[Dict[str, Any]] = None) -> None:
    """Write ``obj`` as ``json_path`` (+ ``tensors_path`` when it holds tensors).

    ``extra``: readable top-level keys written beside the encoded state (``{"state": ...}``).
    """
    from safetensors.torch import save_file

    tensors: Dict[str, torch.Tensor] = {}
    doc = dict(extra or {})
    doc["state"] = encode(obj, tensors)
    doc["tensors_file"] = os.path.basename(tensors_path) if tensors else None
    if tensors:
        save_file(tensors, tensors_path)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)


def load_state(json_path: str) -> Dict[str, Any]:
    """``(document, state)`` of :func:`save_state`: the JSON document with ``state`` decoded."""
    from safetensors.torch import load_file

    with open(json_path, encoding="utf-8") as f:
        doc = json.load(f)
    tensors = {}
    if doc.get("tensors_file"):
        tensors = load_file(os.path.join(os.path.dirname(json_path), doc["tensors_file"]))
    doc["state"] = decode(doc["state"], tensors)
    return doc
