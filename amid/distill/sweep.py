"""``amid-distill sweep``: one base config, a grid of loss settings × seeds, one table with error bars.

    amid-distill sweep --demo --grid grid.yaml --output-dir runs/sweep [--jobs K] [--max-steps 60 ...]

The grid (YAML or JSON)::

    settings:                      # named presets (PRESETS) or mappings of DistillConfig fields
      - forward_kl
      - reverse_kl
      - {name: amid_a2, alpha: 2.0, lam: 0.1}
      - {name: skew_kl_03, preset: skew_kl, lam: 0.3}
    seeds: [0, 1, 2]
    sft_steps: 100                 # optional shared SFT warm start (default: the base config's sft_steps)

With ``sft_steps`` the student is fine-tuned once (cross-entropy only, ``output_dir/sft``) and every run
starts from that warmed student, so runs differ only in their loss setting and seed. Each run lives in
``output_dir/runs/<setting>/seed<k>``; a run with a ``summary.json`` is finished and skipped, a run with a
complete checkpoint is resumed from it (``resume: latest``), so an interrupted sweep continues where it
stopped. The final evaluations (the "student (after)" row of each summary) are aggregated into
``results.md`` / ``results.csv`` / ``results.json`` (mean ± sample standard deviation over seeds) and
``results.png``.

Runs go one after another in this process by default (the teacher is loaded once and its hidden
states are shared between runs on the same data); ``jobs > 1`` runs them as that many
``amid-distill`` processes.

A setting may train from a teacher cache (``amid-distill cache-teacher``) instead of the live teacher,
e.g. to compare offline with online distillation on the same start and seeds::

    settings:
      - {name: online, preset: amid_a0.5}
      - {name: hidden, preset: amid_a0.5, teacher_cache: caches/hidden}
      - {name: topk64, preset: amid_a0.5, teacher_cache: caches/topk64, topk_tail: bucket}

Such runs load no teacher model (in-process, the loaded teacher is simply not passed to them). Each
cache is opened and checked against its setting (manifest, shard sizes, options) before anything runs.
"""
from __future__ import annotations

import csv
import gc
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .config import ConfigError, DistillConfig, did_you_mean, load_config_file

__all__ = ["PRESETS", "METRICS", "SweepPlan", "plan_sweep", "run_sweep", "aggregate", "main"]

#: Every loss field a preset fixes (so the base config's loss fields do not leak into a preset).
_LOSS_DEFAULTS: Dict[str, Any] = dict(alpha=1.0, lam=0.0, divergence="kl", order="pr", ab_alpha=0.2, ab_beta=0.7,
                                      detach_assistant=False, lam_schedule="constant", gjsd_beta=None)

#: Named loss settings, as in amid-math.md §6 (special cases) and the paper's AMiD settings.
PRESETS: Dict[str, Dict[str, Any]] = {
    "forward_kl": dict(alpha=1.0, lam=0.0, order="pr"),                       # KL(p‖q)
    "reverse_kl": dict(alpha=1.0, lam=0.0, order="rp"),                       # KL(q‖p)
    "skew_kl": dict(alpha=-1.0, lam=0.1, order="pr"),                         # DistiLLM SKL, α_s = 0.1
    "skew_rkl": dict(alpha=-1.0, lam=0.9, order="qr"),                        # DistiLLM SRKL, α_s = 0.1 (λ = 1 − α_s)
    "gjsd": dict(gjsd_beta=0.5),                                              # GKD generalized JSD, β = 0.5
    "taid": dict(alpha=1.0, order="rq", detach_assistant=True, lam_schedule="taid", lam_start=0.4,
                 lam_end=1.0),                                                # TAID, adaptive τ from 0.4
    "abkd": dict(alpha=1.0, lam=0.0, divergence="ab", order="pr", ab_alpha=0.2, ab_beta=0.7),  # ABKD (0.2, 0.7)
    "amid_a-3": dict(alpha=-3.0, lam=0.1, order="pr"),
    "amid_a-1": dict(alpha=-1.0, lam=0.1, order="pr"),                        # the same setting as skew_kl
    "amid_a0.5": dict(alpha=0.5, lam=0.1, order="pr"),
}

#: The aggregated metrics: (key in a summary row, title, higher is better).
METRICS: List[Tuple[str, str, bool]] = [
    ("rouge_l", "ROUGE-L", True), ("exact_match", "EM %", True), ("answer_acc", "answer acc %", True),
    ("val_kl", "val KL(teacher‖student)", False), ("val_ce", "val CE", False),
]

#: Fields a setting may not change: they define the runs' common start and place.
_FIXED = ("output_dir", "seed", "resume", "student", "student_gguf_file", "sft_steps")
#: Base-config fields that may differ when an existing sweep directory is continued.
_COSMETIC = ("progress", "plots", "log_every", "report_to", "save_total_limit", "output_dir", "resume")
_SPEC_FILE = "sweep.json"
_FORMAT = "amid-distill-sweep/1"
#: Fields whose values decide the teacher's hidden states of an example (runs sharing them share a cache).
_TEACHER_KEY = ("teacher", "teacher_gguf_file", "teacher_dtype", "teacher_load_kwargs", "attn_implementation",
                "train_file", "validation_file", "test_file", "system_prompt", "max_length", "eval_max_examples",
                "teacher_cache", "device", "bf16")


def _err(msg: str) -> ConfigError:
    return ConfigError(f"amid-distill sweep: {msg}")


# ------------------------------------------------------------------------------------------------
# The plan: settings, seeds, run configs.

class SweepPlan:
    """The resolved sweep: ``settings`` (name -> loss fields), ``seeds``, the SFT config and every run's config."""

    def __init__(self, base: DistillConfig, settings: Dict[str, Dict[str, Any]], seeds: List[int], sft_steps: int,
                 output_dir: str) -> None:
        self.base, self.settings, self.seeds, self.sft_steps = base, settings, seeds, sft_steps
        self.output_dir = output_dir
        self.sft_dir = os.path.join(output_dir, "sft")
        self.sft_config: Optional[DistillConfig] = None
        if sft_steps > 0:
            self.sft_config = base.replace(
                kd_weight=0.0, max_steps=sft_steps, sft_steps=0, student_gen=False, gjsd_beta=None,
                lam_schedule="constant", output_dir=self.sft_dir, eval_teacher=True, resume=False,
                eval_every=0, save_every=base.save_every)
        self.runs: List[Tuple[str, int, DistillConfig]] = []
        for name, fields in settings.items():
            for i, seed in enumerate(seeds):
                first = not self.runs
                cfg = base.replace(**fields).replace(
                    seed=seed, sft_steps=0, resume=False, output_dir=self.run_dir(name, seed),
                    # The teacher is evaluated once: in the SFT run, or else in the first run.
                    eval_teacher=bool(base.eval_teacher and first and sft_steps == 0))
                if sft_steps > 0:
                    # The SFT run's final evaluation is every run's starting point ("SFT start" in the table).
                    cfg = cfg.replace(student=self.sft_dir, student_gguf_file=None, eval_student_before=False)
                self.runs.append((name, seed, cfg))

    def run_dir(self, name: str, seed: int) -> str:
        return os.path.join(self.output_dir, "runs", name, f"seed{seed}")

    def spec(self) -> Dict[str, Any]:
        base = {k: v for k, v in self.base.to_dict().items() if k not in _COSMETIC}
        return {"format": _FORMAT, "base": base, "sft_steps": self.sft_steps,
                "settings": {k: dict(v) for k, v in self.settings.items()}, "seeds": list(self.seeds)}


def _setting(entry: Any, i: int) -> Tuple[str, Dict[str, Any]]:
    where = f"grid 'settings'[{i}]"
    if isinstance(entry, str):
        if entry not in PRESETS:
            raise _err(f"{where}: unknown preset {entry!r}; expected one of {', '.join(PRESETS)} or a mapping of "
                       "config fields")
        return entry, dict(_LOSS_DEFAULTS, **PRESETS[entry])
    if not isinstance(entry, dict):
        raise _err(f"{where}: expected a preset name or a mapping, but got {type(entry).__name__}")
    entry = dict(entry)
    preset = entry.pop("preset", None)
    name = entry.pop("name", None)
    fields: Dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise _err(f"{where}: unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
        fields = dict(_LOSS_DEFAULTS, **PRESETS[preset])
    names = set(DistillConfig.field_names())
    for key, v in entry.items():
        k = str(key).replace("-", "_")
        if k not in names:
            raise _err(f"{where}: unknown config field {key!r}{did_you_mean(str(key))}")
        if k in _FIXED:
            raise _err(f"{where}: field {k!r} is set by the sweep for every run (expected loss / training fields)")
        fields[k] = v
    if name is None:
        name = preset
    if not isinstance(name, str) or not name or any(c in name for c in "/\\") or name.startswith("."):
        raise _err(f"{where}: expected a 'name' (a folder name, no slashes) for a setting without a preset, "
                   f"but got {name!r}")
    if not fields:
        raise _err(f"{where}: setting {name!r} sets no fields (expected a preset or config fields)")
    return name, fields


def plan_sweep(base: DistillConfig, grid: Any, output_dir: Optional[str] = None, *,
               teacher_given: bool = False) -> SweepPlan:
    """Check the grid (a mapping, or a YAML / JSON file path) against ``base``; raises ConfigError before anything runs.

    ``teacher_given``: the teacher will be passed as an object (``teacher`` may then be unset).
    """
    if isinstance(grid, str):
        try:
            grid = load_config_file(grid)
        except ConfigError as e:
            raise _err(str(e).replace("amid-distill: --config: ", "--grid: ")) from None
    if not isinstance(grid, dict):
        raise _err(f"the grid: expected a mapping with 'settings' and 'seeds', but got {type(grid).__name__}")
    unknown = sorted(set(grid) - {"settings", "seeds", "sft_steps"})
    if unknown:
        raise _err(f"the grid: unknown key(s) {unknown}; expected 'settings', 'seeds' and optionally 'sft_steps'")
    entries = grid.get("settings")
    if not isinstance(entries, list) or not entries:
        raise _err(f"grid 'settings': expected a non-empty list of presets or mappings, but got {entries!r}")
    settings: Dict[str, Dict[str, Any]] = {}
    for i, e in enumerate(entries):
        name, fields = _setting(e, i)
        if name in settings:
            raise _err(f"grid 'settings'[{i}]: the name {name!r} is used twice")
        settings[name] = fields
    seeds = grid.get("seeds", [base.seed])
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise _err(f"grid 'seeds': expected a non-empty list of distinct integers >= 0, but got {seeds!r}")
    sft = grid.get("sft_steps", base.sft_steps)
    if isinstance(sft, bool) or not isinstance(sft, int) or sft < 0:
        raise _err(f"grid 'sft_steps': expected an integer >= 0, but got {sft!r}")
    out = output_dir or base.output_dir
    plan = SweepPlan(base.replace(output_dir=out, sft_steps=0), settings, seeds, sft, out)
    # Every run's config must be valid on its own (the student folder of the SFT run does not exist yet).
    for name, seed, cfg in plan.runs:
        try:
            cfg.replace(student=base.student).validate(teacher_given=teacher_given)
        except ConfigError as e:
            raise _err(f"setting {name!r}: {e}") from None
    if plan.sft_config is not None:
        plan.sft_config.replace().validate(teacher_given=teacher_given)
    _check_caches(plan)
    _check_output_dir(plan)
    return plan


def _check_caches(plan: SweepPlan) -> None:
    """Every teacher cache a setting names is complete and fits the run's options (manifest and shard sizes only,
    no data read), so a missing or mismatched cache fails before anything runs."""
    from .cache import OfflineTeacher

    seen = set()
    for name, _, cfg in plan.runs:
        if not cfg.teacher_cache or (name, cfg.teacher_cache) in seen:
            continue
        seen.add((name, cfg.teacher_cache))
        try:
            OfflineTeacher.open(cfg.teacher_cache).check_config(cfg)
        except ConfigError as e:
            raise _err(f"setting {name!r}: {e}") from None


def _comparable(spec: Dict[str, Any]) -> Dict[str, Any]:
    return json.loads(json.dumps(spec))  # tuples -> lists, as read back from JSON


def _check_output_dir(plan: SweepPlan) -> None:
    """The output directory is empty, new, or holds this sweep (same base, SFT and settings; more may be added)."""
    out = plan.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise _err(f"output_dir: expected a directory, but '{out}' is a file")
    spec_path = os.path.join(out, _SPEC_FILE)
    if not os.path.isdir(out) or not os.listdir(out):
        return
    if not os.path.isfile(spec_path):
        raise _err(f"output_dir: '{out}' is not empty and holds no {_SPEC_FILE} (not a sweep's output); expected a new "
                   "or empty directory, or the directory of this sweep to continue it")
    try:
        with open(spec_path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        raise _err(f"output_dir: '{spec_path}' is unreadable ({e}); expected the {_SPEC_FILE} of a sweep") from None
    new = _comparable(plan.spec())
    if not isinstance(old, dict) or old.get("format") != _FORMAT:
        raise _err(f"output_dir: '{spec_path}' is not an {_FORMAT} file")
    diffs = sorted(k for k in set(old["base"]) | set(new["base"]) if old["base"].get(k) != new["base"].get(k))
    if diffs:
        raise _err(f"output_dir: '{out}' holds another sweep (its base config differs in {diffs}); use another "
                   "output directory")
    if old.get("sft_steps") != new["sft_steps"]:
        raise _err(f"output_dir: '{out}' holds another sweep (sft_steps {old.get('sft_steps')} there, "
                   f"{new['sft_steps']} here); use another output directory")
    for name, fields in new["settings"].items():
        if name in old["settings"] and old["settings"][name] != fields:
            raise _err(f"output_dir: '{out}' holds another sweep (setting {name!r} has other fields there: "
                       f"{old['settings'][name]}); use another output directory or another setting name")


def _write_spec(plan: SweepPlan) -> None:
    spec = _comparable(plan.spec())
    path = os.path.join(plan.output_dir, _SPEC_FILE)
    if os.path.isfile(path):  # continuing: keep the settings and seeds run before
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        spec["settings"] = dict(old["settings"], **spec["settings"])
        spec["seeds"] = sorted(set(old["seeds"]) | set(spec["seeds"]))
    os.makedirs(plan.output_dir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(spec, f, indent=1)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# Running.

def run_state(output_dir: str) -> str:
    """'done' (has summary.json), 'resume' (has a complete checkpoint) or 'new'."""
    from .trainer import checkpoint_problem, list_checkpoints

    if os.path.isfile(os.path.join(output_dir, "summary.json")):
        return "done"
    if any(checkpoint_problem(p) is None for p in list_checkpoints(output_dir)):
        return "resume"
    return "new"


def _final_row(summary: Dict[str, Any], label: str = "student (after)") -> Dict[str, Any]:
    for r in summary.get("rows", []):
        if r.get("model") == label:
            return r
    return {}


def _read_summary(run_dir: str) -> Dict[str, Any]:
    with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
        return json.load(f)


def _fmt(v: Optional[float], digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _progress(i: int, n: int, label: str, what: str) -> None:
    print(f"[sweep {i}/{n}] {label}: {what}", flush=True)


class _Shared:
    """The teacher, its tokenizer and its hidden-state caches, shared by in-process runs."""

    def __init__(self, teacher=None, tokenizer=None) -> None:
        self.teacher, self.tokenizer = teacher, tokenizer
        self.given = teacher is not None
        self.caches: Dict[str, Tuple[Dict[Any, Any], List[int]]] = {}

    def run(self, cfg: DistillConfig, stop_after: Optional[int] = None) -> Optional[Dict[str, Any]]:
        from .trainer import Distiller

        # A setting with a teacher cache trains without a teacher model (the shared one is not passed; its
        # tokenizer is, and is checked against the cache's).
        d = Distiller(cfg, teacher=None if cfg.teacher_cache else self.teacher, tokenizer=self.tokenizer)
        if self.teacher is None and d.offline is None:
            self.teacher, self.tokenizer = d.teacher, d.tokenizer
        key = json.dumps([cfg.to_dict()[k] for k in _TEACHER_KEY], default=str)
        cache, size = self.caches.setdefault(key, ({}, [0]))
        if d.offline is None and cfg.cache_teacher and not d._teacher_sharded:
            d._teacher_cache.update(cache)
            d._teacher_cache_bytes = max(d._teacher_cache_bytes, size[0])
        try:
            return d.train(stop_after=stop_after)
        finally:
            if d.offline is None and cfg.cache_teacher:
                cache.update(d._teacher_cache)
                size[0] = d._teacher_cache_bytes
            del d
            gc.collect()


def _subprocess(cfg: DistillConfig, log_path: str) -> subprocess.Popen:
    cfg_path = os.path.join(cfg.output_dir, "sweep_run_config.json")
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg.to_dict(), f, indent=1)
    log = open(log_path, "a", encoding="utf-8")
    return subprocess.Popen([sys.executable, "-m", "amid.distill.cli", "--config", cfg_path, "--no-progress"],
                            stdout=log, stderr=subprocess.STDOUT)


def _drop_checkpoints(run_dir: str) -> None:
    """A finished run (summary.json written) needs no checkpoints: its final student is in run_dir itself."""
    import shutil

    from .trainer import list_checkpoints

    if os.path.isfile(os.path.join(run_dir, "summary.json")):
        for p in list_checkpoints(run_dir):
            shutil.rmtree(p, ignore_errors=True)


def run_sweep(base: DistillConfig, grid: Any, *, output_dir: Optional[str] = None, jobs: int = 1, teacher=None,
              tokenizer=None, stop_after_runs: Optional[int] = None, keep_checkpoints: bool = False,
              aggregate_only: bool = False) -> Dict[str, Any]:
    """Run (or continue) a sweep and aggregate it; returns the aggregate (also written as results.*).

    ``teacher`` / ``tokenizer``: a teacher model object (as for ``Distiller``; in-process runs only).
    ``stop_after_runs=k``: return after k runs have been trained in this call (tests: a killed sweep).
    ``keep_checkpoints``: keep the checkpoints of finished runs (default: removed once the run's summary is written).
    ``aggregate_only``: train nothing; aggregate the finished runs (settings may then have fewer seeds).
    """
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise _err(f"jobs: expected an integer >= 1, but got {jobs!r}")
    if jobs > 1 and teacher is not None:
        raise _err("jobs: a teacher passed as an object can only be used by in-process runs (jobs = 1)")
    plan = plan_sweep(base, grid, output_dir, teacher_given=teacher is not None)
    if aggregate_only:
        result = aggregate(plan)
        print("\n" + result["table"] + "\n", flush=True)
        return result
    _write_spec(plan)
    shared = _Shared(teacher, tokenizer)
    n = len(plan.runs) + (1 if plan.sft_config is not None else 0)
    i = 0
    trained = 0

    def start(cfg: DistillConfig) -> Tuple[str, DistillConfig]:
        state = run_state(cfg.output_dir)
        return state, (cfg.replace(resume="latest") if state == "resume" else cfg)

    if plan.sft_config is not None:
        i += 1
        state, cfg = start(plan.sft_config)
        if state == "done":
            _progress(i, n, "sft", "finished before, skipped")
        else:
            t0 = time.perf_counter()
            _progress(i, n, "sft", f"{plan.sft_steps} cross-entropy steps" + (" (resumed)" if state == "resume" else ""))
            if jobs > 1:
                os.makedirs(cfg.output_dir, exist_ok=True)
                p = _subprocess(cfg, os.path.join(cfg.output_dir, "sweep.log"))
                if p.wait() != 0:
                    raise RuntimeError(f"amid-distill sweep: the SFT run failed (exit {p.returncode}); see "
                                       f"{os.path.join(cfg.output_dir, 'sweep.log')}")
            else:
                shared.run(cfg)
            trained += 1
            if not keep_checkpoints:
                _drop_checkpoints(cfg.output_dir)
            row = _final_row(_read_summary(cfg.output_dir))
            _progress(i, n, "sft", f"done in {time.perf_counter() - t0:.0f} s, test ROUGE-L {_fmt(row.get('rouge_l'))}, "
                                   f"val CE {_fmt(row.get('val_ce'), 3)}")
        if stop_after_runs is not None and trained >= stop_after_runs:
            return {}

    todo = []
    for name, seed, cfg in plan.runs:
        i += 1
        label = f"{name} seed {seed}"
        state, cfg = start(cfg)
        if state == "done":
            _progress(i, n, label, "finished before, skipped")
        else:
            todo.append((i, label, state, cfg))
    if jobs == 1:
        for i, label, state, cfg in todo:
            if stop_after_runs is not None and trained >= stop_after_runs:
                return {}
            t0 = time.perf_counter()
            _progress(i, n, label, "resuming from its last checkpoint" if state == "resume" else "running")
            shared.run(cfg)
            trained += 1
            if not keep_checkpoints:
                _drop_checkpoints(cfg.output_dir)
            row = _final_row(_read_summary(cfg.output_dir))
            _progress(i, n, label, f"done in {time.perf_counter() - t0:.0f} s, test ROUGE-L "
                                   f"{_fmt(row.get('rouge_l'))}, val KL {_fmt(row.get('val_kl'), 3)}")
    else:
        running: List[Tuple[int, str, DistillConfig, subprocess.Popen, float]] = []
        failed = []
        queue = list(todo)
        while queue or running:
            while queue and len(running) < jobs:
                i, label, state, cfg = queue.pop(0)
                os.makedirs(cfg.output_dir, exist_ok=True)
                _progress(i, n, label, "resuming from its last checkpoint" if state == "resume" else "started")
                running.append((i, label, cfg, _subprocess(cfg, os.path.join(cfg.output_dir, "sweep.log")),
                                time.perf_counter()))
            time.sleep(0.5)
            for item in list(running):
                i, label, cfg, p, t0 = item
                if p.poll() is None:
                    continue
                running.remove(item)
                if p.returncode != 0:
                    failed.append(label)
                    _progress(i, n, label, f"FAILED (exit {p.returncode}); see {cfg.output_dir}/sweep.log")
                    continue
                if not keep_checkpoints:
                    _drop_checkpoints(cfg.output_dir)
                row = _final_row(_read_summary(cfg.output_dir))
                _progress(i, n, label, f"done in {time.perf_counter() - t0:.0f} s, test ROUGE-L "
                                       f"{_fmt(row.get('rouge_l'))}, val KL {_fmt(row.get('val_kl'), 3)}")
        if failed:
            raise RuntimeError(f"amid-distill sweep: {len(failed)} run(s) failed: {failed}; run the sweep again to "
                               "retry them (finished runs are kept)")
    result = aggregate(plan)
    print("\n" + result["table"] + "\n", flush=True)
    print(f"[sweep] results: {os.path.join(plan.output_dir, 'results.md')} (.csv, .json, .png)", flush=True)
    return result


# ------------------------------------------------------------------------------------------------
# Aggregation.

def _mean_std(xs: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def aggregate(plan: SweepPlan, *, plot: bool = True) -> Dict[str, Any]:
    """Mean ± sample std (n − 1) over seeds of each setting's final evaluation; writes results.{md,csv,json,png}."""
    out = plan.output_dir
    split = None
    reference: Dict[str, Dict[str, Any]] = {}
    if plan.sft_config is not None and os.path.isfile(os.path.join(plan.sft_dir, "summary.json")):
        s = _read_summary(plan.sft_dir)
        split = s.get("generation_split")
        reference["teacher"] = _final_row(s, "teacher")
        reference["SFT start"] = _final_row(s, "student (after)")
    rows = []
    for name, fields in plan.settings.items():
        per_seed = {}
        for seed in plan.seeds:
            d = plan.run_dir(name, seed)
            if not os.path.isfile(os.path.join(d, "summary.json")):
                continue
            s = _read_summary(d)
            split = split or s.get("generation_split")
            per_seed[seed] = _final_row(s)
            if "teacher" not in reference and _final_row(s, "teacher"):
                reference["teacher"] = _final_row(s, "teacher")
        row: Dict[str, Any] = {"setting": name, "fields": fields, "n": len(per_seed),
                               "seeds": sorted(per_seed), "per_seed": {}}
        for key, _, _ in METRICS:
            vals = [per_seed[s].get(key) for s in sorted(per_seed)]
            row["per_seed"][key] = vals
            row[key + "_mean"], row[key + "_std"] = _mean_std(vals)
        rows.append(row)
    split_name = split or "test"
    titles = [(k, (f"{split_name} " if k in ("rouge_l", "exact_match", "answer_acc") else "") + t)
              for k, t, _ in METRICS]
    lines = ["| setting | seeds | " + " | ".join(t for _, t in titles) + " |",
             "|---|---|" + "|".join("---" for _ in titles) + "|"]
    for r in rows:
        cells = []
        for k, _ in titles:
            m, s = r[k + "_mean"], r[k + "_std"]
            digits = 3 if k in ("val_kl", "val_ce") else 1
            cells.append("-" if m is None else (f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"))
        lines.append(f"| {r['setting']} | {r['n']} | " + " | ".join(cells) + " |")
    for label, ref in reference.items():
        if ref:
            cells = [_fmt(ref.get(k), 3 if k in ("val_kl", "val_ce") else 1) for k, _ in titles]
            lines.append(f"| *{label}* | – | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    result = {"format": _FORMAT, "generation_split": split_name, "seeds": plan.seeds, "sft_steps": plan.sft_steps,
              "rows": rows, "reference": reference, "table": table,
              "note": "mean ± sample standard deviation (n - 1) over seeds of each run's final evaluation"}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n\nmean ± sample standard deviation (n − 1) over seeds of each run's final evaluation; "
                f"{split_name} split for the generation metrics, validation for KL and CE.\n")
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "results.csv"), "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting", "n"] + [f"{k}_{x}" for k, _, _ in METRICS for x in ("mean", "std")])
        for r in rows:
            w.writerow([r["setting"], r["n"]] + ["" if r[f"{k}_{x}"] is None else repr(r[f"{k}_{x}"])
                                                 for k, _, _ in METRICS for x in ("mean", "std")])
        for label, ref in reference.items():
            if ref:
                w.writerow([label, ""] + [x for k, _, _ in METRICS
                                          for x in ("" if ref.get(k) is None else repr(ref[k]), "")])
    if plot and rows:
        result["plot"] = _plot(rows, reference, split_name, os.path.join(out, "results.png"))
    return result


def _plot(rows: List[Dict[str, Any]], reference: Dict[str, Dict[str, Any]], split: str, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("rouge_l", f"{split} ROUGE-L (higher is better)"), ("val_kl", "val KL(teacher‖student) (lower is better)")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 2.2), sharey=True)
    ys = list(range(len(rows)))
    for ax, (key, title) in zip(axes, panels):
        for y, r in zip(ys, rows):
            vals = [v for v in r["per_seed"][key] if v is not None]
            ax.scatter(vals, [y] * len(vals), s=12, color="0.6", zorder=2)
            if r[key + "_mean"] is not None:
                ax.errorbar(r[key + "_mean"], y, xerr=r[key + "_std"] or 0.0, fmt="o", color="C0", capsize=4, zorder=3)
        for label, style, color in (("teacher", "--", "C3"), ("SFT start", ":", "C2")):
            v = reference.get(label, {}).get(key)
            if v is not None:
                ax.axvline(v, linestyle=style, color=color, label=label)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_ylim(len(rows) - 0.5, -0.5)  # first setting on top
        if any(reference.get(lbl, {}).get(key) is not None for lbl in ("teacher", "SFT start")):
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=2, frameon=False)
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels([f"{r['setting']} (n={r['n']})" for r in rows])
    fig.suptitle("mean ± std over seeds (grey: single seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# CLI: amid-distill sweep ...

def main(argv: List[str]) -> int:
    """``amid-distill sweep --grid GRID [--jobs K] [--config BASE] [--demo] [field flags]``."""
    from .cli import build_parser

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    parser.prog = "amid-distill sweep"
    parser.description = ("Run a grid of loss settings x seeds from one base config and aggregate the final "
                          "evaluations (mean ± std over seeds). Presets: " + ", ".join(PRESETS) + ".")
    parser.add_argument("--grid", required=True, help="YAML/JSON grid: settings (presets or field mappings), seeds, "
                                                      "optional sft_steps (shared SFT warm start)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time as separate processes (default 1: "
                                                            "one after another in this process)")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep finished runs' checkpoints (default: removed once a run's summary is written)")
    parser.add_argument("--aggregate-only", action="store_true",
                        help="train nothing: aggregate the finished runs into results.* (e.g. of a stopped sweep)")
    try:
        from .cli import resolve_config

        args = parser.parse_args(argv)
        base = resolve_config(_without(argv, ("--grid", "--jobs"), ("--keep-checkpoints", "--aggregate-only")))
        if getattr(base, "_print_only", False):
            plan = plan_sweep(base, args.grid)
            print(json.dumps(_comparable(plan.spec()), indent=2))
            return 0
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:
            pass
        run_sweep(base, args.grid, jobs=args.jobs, keep_checkpoints=args.keep_checkpoints,
                  aggregate_only=args.aggregate_only)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    except ValueError as e:
        if not str(e).startswith("amid-distill"):
            raise
        print(str(e), file=sys.stderr)
        return 2
    return 0


def _without(argv: List[str], flags: Sequence[str], switches: Sequence[str] = ()) -> List[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in switches:
            continue
        if a in flags:
            skip = True
            continue
        if any(a.startswith(f + "=") for f in flags):
            continue
        out.append(a)
    return out
