"""Offline distillation benchmark (issue 10): online teacher vs a 'hidden' cache vs 'topk' caches.

    python bench/bench_offline.py                 # CPU, the demo models (SmolLM2-135M-Instruct -> 6 layers)

    python bench/bench_offline.py --op-only       # the loss op alone: sparse-teacher op vs dense-op path

    python bench/bench_offline.py --quality [--student SFT_DIR]   # test ROUGE-L: cache vs online, 3 seeds

Writes bench/results/<device>-offline.csv (per mode: cache bytes per token, cache build time,
training step time, peak RSS of the training process) and <device>-topk-error.csv (loss and
gradient relative error of amid.amid_loss_topk against the exact loss, as a function of k, at the
demo's V = 49152, on real teacher / student logits of demo response tokens), and a plot.

Each training measurement runs in its own process (a fresh peak RSS): the online process loads the
teacher, the cached ones do not. Step times are the mean of the timed steps after one warm-up step.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

MODES = [("online", None), ("hidden", None), ("topk", 16), ("topk", 64), ("topk", 256)]


def _config(work: str, n_train: int, **kw):
    from amid.distill import DistillConfig
    from amid.distill.config import demo_data_path
    from amid.distill.demo import demo_settings

    train = os.path.join(work, "train.jsonl")
    if not os.path.isfile(train):
        with open(demo_data_path("train")) as f, open(train, "w") as g:
            for i, line in enumerate(f):
                if i >= n_train:
                    break
                g.write(line)
    d = demo_settings()
    d.update(train_file=train, validation_file=None, test_file=None, progress=False, plots=False, eval_teacher=False,
             micro_batch_size=4, grad_accum_steps=1, max_steps=100, device="cpu", output_dir=os.path.join(work, "out"),
             cache_teacher=False)
    d.update(kw)
    return DistillConfig(**d)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(work: str, n_train: int, threads: int) -> None:
    """Build the caches (the teacher loaded once) and measure the top-k error against exact."""
    import torch

    import amid
    from amid.distill import models as M
    from amid.distill.cache import cache_teacher
    from amid.distill.data import IGNORE_INDEX, collate_train, encode_records, load_records

    torch.set_num_threads(threads)
    cfg = _config(work, n_train)
    p, g = M.resolve_model_path(cfg.teacher, cfg.teacher_gguf_file)
    tok = M.load_tokenizer(p, g)
    teacher = M.load_causal_lm(p, g, role="teacher")
    out = {}
    for mode, k in MODES[1:]:
        name = mode if k is None else f"{mode}{k}"
        t0 = time.perf_counter()
        s = cache_teacher(cfg, os.path.join(work, f"cache-{name}"), mode=mode, k=k or 64, teacher=teacher,
                          tokenizer=tok, progress=False)
        out[name] = {"bytes_per_token": s["bytes_per_token"], "cache_build_s": time.perf_counter() - t0,
                     "tokens": s["tokens"]}
    out["n_vocab"] = len(tok)
    out["peak_rss_mb"] = _peak_rss_mb()
    print("RESULT " + json.dumps(out), flush=True)


def error(work: str, n_train: int, threads: int) -> None:
    """Top-k error against exact, on real logits (student = the 6-layer student built from the teacher):
    with the log-probabilities stored in float16 (as the cache does) and exact (float64)."""
    import torch

    import amid
    from amid.distill import models as M
    from amid.distill.data import IGNORE_INDEX, collate_train, encode_records, load_records

    torch.set_num_threads(threads)
    cfg = _config(work, n_train)
    p, g = M.resolve_model_path(cfg.teacher, cfg.teacher_gguf_file)
    tok = M.load_tokenizer(p, g)
    teacher = M.load_causal_lm(p, g, role="teacher")
    out = {}
    student = M.build_student_from_teacher(teacher, cfg.student_num_layers)
    ex = encode_records(tok, load_records(cfg.train_file), system_prompt=cfg.system_prompt, max_length=cfg.max_length)
    b = collate_train([{"input_ids": e.input_ids, "labels": e.labels} for e in ex[:8]], tok.pad_token_id)
    rows = b["labels"][:, 1:] != IGNORE_INDEX
    with torch.no_grad():
        t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1][rows].double()
        s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1][rows].double()
    v = len(tok)
    t, s = t[:, :v], s[:, :v]
    opts = dict(alpha=cfg.alpha, lam=cfg.lam, divergence=cfg.divergence, order=cfg.order)

    def lg(fn):
        x = s.clone().requires_grad_(True)
        loss = fn(x)
        (gr,) = torch.autograd.grad(loss, x)
        return float(loss), gr

    exact, g_exact = lg(lambda x: amid.amid_loss(x, t, **opts))
    lp_full = torch.log_softmax(t, -1)
    err = []
    for k in (1, 4, 16, 64, 256, 1024, 4096, 16384):
        lp, idx = torch.topk(lp_full, k, dim=-1)
        tail = (1 - lp.exp().sum(-1)).clamp_min(0)
        for tl, store in itertools.product(("bucket", "renorm"), ("float16", "float64")):
            lpk = lp.half() if store == "float16" else lp  # float16: as stored by the cache
            loss, gk = lg(lambda x: amid.amid_loss_topk(x, lpk, idx.int(), tail=tl, **opts))
            err.append({"k": k, "tail": tl, "logprobs": store, "V": v, "rows": int(t.shape[0]), "loss": loss,
                        "exact_loss": exact,
                        "loss_rel_err": abs(loss - exact) / abs(exact),
                        "grad_rel_err": float((gk - g_exact).norm() / g_exact.norm()),
                        "teacher_tail_mass_mean": float(tail.mean())})
    out["topk_error"] = err
    print("RESULT " + json.dumps(out), flush=True)


def train(work: str, n_train: int, mode: str, k: int, steps: int, threads: int) -> None:
    import torch

    from amid.distill.trainer import Distiller

    torch.set_num_threads(threads)
    name = mode if mode in ("online", "hidden") else f"{mode}{k}"
    kw = {"output_dir": os.path.join(work, f"out-{name}")}
    if mode != "online":
        kw["teacher_cache"] = os.path.join(work, f"cache-{name}")
    t0 = time.perf_counter()
    d = Distiller(_config(work, n_train, **kw))
    setup = time.perf_counter() - t0
    d.eval_sets = {}
    d.train_step()  # warm-up
    times, cpu = [], []
    for _ in range(steps):
        t1, c1 = time.perf_counter(), time.process_time()
        d.train_step()
        times.append(time.perf_counter() - t1)
        cpu.append(time.process_time() - c1)
    # CPU seconds of this process per step (all its threads): robust on a machine shared with other jobs.
    print("RESULT " + json.dumps({"mode": name, "step_s": sum(times) / len(times), "step_s_min": min(times),
                                  "step_cpu_s": sum(cpu) / len(cpu), "step_cpu_s_min": min(cpu),
                                  "setup_s": setup, "peak_rss_mb": _peak_rss_mb(), "steps": steps}), flush=True)


def profile(work: str, n_train: int, mode: str, k: int, steps: int, threads: int) -> None:
    """One training step cut into its parts (wall and process CPU seconds of each, per step): the teacher's
    body forward (online) or the cache read (cached), the teacher-head GEMM on the kept rows, the student's
    forward (body, head), the loss forward (the amid ops write the gradient in the forward), the backward,
    gradient clipping and the optimizer. Timers wrap the trainer's own functions, so the step is the real one."""
    import statistics

    import torch

    import amid
    from amid.distill import trainer as T
    from amid.distill.trainer import Distiller

    torch.set_num_threads(threads)
    name = mode if mode in ("online", "hidden") else f"{mode}{k}"
    kw = {"output_dir": os.path.join(work, f"prof-{name}")}
    if mode != "online":
        kw["teacher_cache"] = os.path.join(work, f"cache-{name}")
    d = Distiller(_config(work, n_train, **kw))
    d.eval_sets = {}
    acc = {}

    def timed(label, fn):
        def run(*a, **kw):
            lab = label(*a, **kw) if callable(label) else label
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                w, c = acc.setdefault(lab, [0.0, 0.0])
                acc[lab] = [w + time.perf_counter() - t0, c + time.process_time() - c0]
        return run

    d._teacher_hidden = timed("teacher body forward" if mode == "online" else "cache read", d._teacher_hidden)
    T._apply_head = timed(lambda h, *a: "student head" if torch.is_grad_enabled() else "teacher head GEMM",
                          T._apply_head)
    T.StudentEngine._hidden_rows = timed("student body forward", T.StudentEngine._hidden_rows)
    T.amid.amid_loss = timed("loss forward (amid_loss, gradient in the forward)", amid.amid_loss)
    import amid.topk as TK
    TK.amid_loss_topk = timed("loss forward (amid_loss_topk)", TK.amid_loss_topk)
    from amid.distill import cache as C
    C.tail_shares = timed("top-k tail shares (log)", C.tail_shares)
    torch.Tensor.backward = timed("backward", torch.Tensor.backward)
    d._clip = timed("clip grad norm", d._clip)
    d.optimizer.step = timed("optimizer (AdamW)", d.optimizer.step)
    d.optimizer.zero_grad = timed("zero_grad", d.optimizer.zero_grad)
    rows = []
    for i in range(steps + 1):
        acc.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        d.train_step()
        total = [time.perf_counter() - t0, time.process_time() - c0]
        if i:  # the first step warms up (allocations, the cache's checksums)
            parts = dict(acc)
            parts["rest"] = [total[0] - sum(v[0] for v in acc.values()), total[1] - sum(v[1] for v in acc.values())]
            rows.append({"total": total, "parts": parts})
    labels = list(rows[0]["parts"])
    med = {lab: [statistics.median(r["parts"][lab][j] for r in rows) for j in (0, 1)] for lab in labels}
    best = min(rows, key=lambda r: r["total"][0])
    print("RESULT " + json.dumps({"mode": name, "steps": steps, "median_total": [statistics.median(r["total"][j]
                                  for r in rows) for j in (0, 1)], "median": med, "best_step": best,
                                  "rows": rows}), flush=True)


def op_timing(threads: int, reps: int, rows: int = 256, vocab: int = 49152) -> list:
    """The loss alone (no model), forward + backward (gradient written in the forward) on random logits
    [rows, V]: the sparse-teacher op (amid_loss_topk, backend 'op') against the former dense-op path
    (backend 'dense': renorm builds an [N, V] teacher, bucket [N, k + 1] bins + autograd) and the dense
    loss with a full teacher. Median and min of ``reps`` timed calls after one warm-up."""
    import statistics

    import torch

    import amid

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        s = (torch.randn(rows, vocab, generator=g) * 3).to(dtype)
        t = (torch.randn(rows, vocab, generator=g) * 3).to(dtype)
        lp_full = torch.log_softmax(t.float(), -1)

        def timed(fn):
            ts = []
            for i in range(reps + 1):
                x = s.clone().requires_grad_(True)
                t0 = time.perf_counter()
                fn(x).backward()
                if i:
                    ts.append(time.perf_counter() - t0)
            return statistics.median(ts), min(ts)

        med, best = timed(lambda x: amid.amid_loss(x, t))
        out.append({"provider": "dense amid_loss (full teacher)", "tail": "", "k": vocab, "dtype": str(dtype)[6:],
                    "ms_p50": med * 1e3, "ms_min": best * 1e3})
        for k in (16, 64, 256):
            lp, idx = torch.topk(lp_full, k, dim=-1)
            lp, idx = lp.half(), idx.int()  # as stored by a topk cache
            for tail in ("bucket", "renorm"):
                for backend in ("op", "dense"):
                    med, best = timed(lambda x: amid.amid_loss_topk(x, lp, idx, tail=tail, backend=backend,
                                                                    validate=False))
                    out.append({"provider": f"amid_loss_topk backend={backend}", "tail": tail, "k": k,
                                "dtype": str(dtype)[6:], "ms_p50": med * 1e3, "ms_min": best * 1e3})
                    print(out[-1], flush=True)
    return out


def _write_op_csv(rows: list, threads: int, n_rows: int, vocab: int, reps: int) -> str:
    import csv

    from common import RESULTS_DIR, device_name, git_sha  # noqa: E402

    path = os.path.join(RESULTS_DIR, "cpu-topk-op.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["provider", "tail", "k", "N", "V", "dtype", "fwd_bwd_ms_p50", "fwd_bwd_ms_min", "reps", "device",
                    "git", "threads", "note"])
        for r in rows:
            w.writerow([r["provider"], r["tail"], r["k"], n_rows, vocab, r["dtype"], f"{r['ms_p50']:.2f}",
                        f"{r['ms_min']:.2f}", reps, device_name("cpu"), git_sha(), threads,
                        "loss forward + backward on random logits; shared machine: the minimum is the headline"])
    return path


# ------------------------------------------------------------------------------------------------
# Quality: a student trained from a cache vs online (issue 10 item 5), as an amid-distill sweep.

QUALITY_SETTINGS = [("online", None, None), ("hidden", "hidden", None), ("topk64", "topk", 64)]


def quality(work: str, out_dir: str, student: str, seeds: list, threads: int) -> None:
    """Online teacher vs a 'hidden' cache vs a 'topk' k = 64 (bucket) cache: the loss study's base config
    (bench/results/sweep/sweep.json: 20 distillation steps of 8 examples from its SFT-warmed student, the
    amid_a0.5 loss, 20 validation / 20 test examples), one sweep setting per teacher source, same seeds."""
    import torch

    from amid.distill import DistillConfig
    from amid.distill import models as M
    from amid.distill import sweep as S
    from amid.distill.cache import cache_teacher
    from amid.distill.config import demo_data_path

    torch.set_num_threads(threads)
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(HERE, "results", "sweep", "sweep.json"), encoding="utf-8") as f:
        study = json.load(f)
    base = dict(study["base"])
    base.update(train_file=demo_data_path("train"), validation_file=demo_data_path("validation"),
                test_file=demo_data_path("test"), progress=False, plots=False, output_dir=os.path.join(work, "sweep"),
                # the teacher's row and the SFT start are the loss study's (bench/results/sweep): not repeated
                eval_teacher=False, eval_student_before=False)
    if student:
        base["student"] = student
    cfg = DistillConfig(**base)
    p, g = M.resolve_model_path(cfg.teacher, cfg.teacher_gguf_file)
    tok = M.load_tokenizer(p, g)
    teacher = M.load_causal_lm(p, g, role="teacher")
    # Times of the first call in this work directory (a repeated call finds the caches and runs finished).
    timing_path = os.path.join(work, "quality-timing.json")
    timing = json.load(open(timing_path)) if os.path.isfile(timing_path) else {"caches": {}}
    caches, built = {}, {}
    for name, mode, k in QUALITY_SETTINGS:
        if mode is None:
            continue
        caches[name] = os.path.join(work, f"cache-{name}")
        t0 = time.perf_counter()
        s = cache_teacher(cfg, caches[name], mode=mode, k=k or 64, teacher=teacher, tokenizer=tok, progress=False)
        built[name] = {"tokens": s["tokens"], "bytes_per_token": s["bytes_per_token"], "seconds": time.perf_counter() - t0,
                       "shards_written": s["shards_written"]}
        if s["shards_written"] or name not in timing["caches"]:
            timing["caches"][name] = built[name]["seconds"]
        built[name]["seconds"] = timing["caches"][name]
        print(f"cache {name}: {s['tokens']} tokens, {s['bytes_per_token']:.0f} bytes/token, "
              f"{built[name]['seconds']:.0f} s", flush=True)
    json.dump(timing, open(timing_path, "w"))
    loss = {k: v for k, v in study["settings"]["amid_a0.5"].items()}
    settings = []
    for name, mode, k in QUALITY_SETTINGS:
        st = dict({"name": name}, **loss)
        if mode is not None:
            st["teacher_cache"] = caches[name]
            if mode == "topk":
                st["topk_tail"] = "bucket"
        settings.append(st)
    grid = {"settings": settings, "seeds": seeds, "sft_steps": 0 if student else study["sft_steps"]}
    t0 = time.perf_counter()
    res = S.run_sweep(cfg, grid, teacher=teacher, tokenizer=tok)
    timing.setdefault("sweep_seconds", time.perf_counter() - t0)
    json.dump(timing, open(timing_path, "w"))
    del teacher
    names = [st["name"] for st in settings]
    full_kl = full_teacher_kl(work, names, seeds, threads)
    _write_quality(os.path.join(work, "sweep"), out_dir, res, built, grid, student, timing["sweep_seconds"], threads,
                   full_kl)


def full_teacher_kl(work: str, names: list, seeds: list, threads: int) -> dict:
    """Validation KL(teacher ‖ student) of every run's final student against the full teacher (through the exact
    'hidden' cache). A topk run's own evaluation measures KL against its renormalised top-k teacher (all the
    cache holds), which is another quantity than the online runs' full-teacher KL."""
    import torch

    from amid.distill import DistillConfig
    from amid.distill.trainer import Distiller

    torch.set_num_threads(threads)
    out = {}
    for name in names:
        for seed in seeds:
            run = os.path.join(work, "sweep", "runs", name, f"seed{seed}")
            cfg = json.load(open(os.path.join(run, "distill_config.json")))
            cfg.update(student=run, teacher_cache=os.path.join(work, "cache-hidden"), test_file=None,
                       output_dir=os.path.join(work, "full-teacher-kl", name, f"seed{seed}"), overwrite_output_dir=True)
            d = Distiller(DistillConfig(**cfg))
            rec = d.evaluate("validation", generate=False, phase="final")
            out[f"{name}/{seed}"] = {"val_kl_full_teacher": rec["kl"], "val_ce": rec["ce"]}
            print(name, seed, out[f"{name}/{seed}"], flush=True)
            del d
    return out


def _write_quality(sweep_dir: str, out_dir: str, res: dict, built: dict, grid: dict, student: str, sweep_s: float,
                   threads: int, full_kl: dict) -> None:
    import csv
    import shutil

    from common import device_name, git_sha  # noqa: E402

    os.makedirs(out_dir, exist_ok=True)
    for f in ("results.md", "results.csv", "results.json", "results.png", "sweep.json"):
        if os.path.isfile(os.path.join(sweep_dir, f)):
            shutil.copy(os.path.join(sweep_dir, f), os.path.join(out_dir, f))
    names = [s["name"] for s in grid["settings"]]
    runs, losses = [], {}
    for name in names:
        for seed in grid["seeds"]:
            d = os.path.join(sweep_dir, "runs", name, f"seed{seed}")
            dst = os.path.join(out_dir, "runs", name, f"seed{seed}")
            os.makedirs(dst, exist_ok=True)
            for f in ("distill_config.json", "summary.json", "metrics.jsonl"):
                shutil.copy(os.path.join(d, f), os.path.join(dst, f))
            summ = json.load(open(os.path.join(d, "summary.json")))
            row = [r for r in summ["rows"] if r["model"] == "student (after)"][0]
            recs = [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"))]
            train = [r for r in recs if r["type"] == "train"]
            losses[(name, seed)] = train
            runs.append({"setting": name, "seed": seed, "rouge_l": row["rouge_l"], "val_kl": row["val_kl"],
                         "val_ce": row["val_ce"], "exact_match": row["exact_match"], "answer_acc": row["answer_acc"],
                         "val_kl_full_teacher": full_kl[f"{name}/{seed}"]["val_kl_full_teacher"],
                         "train_seconds": summ.get("train_seconds_this_process"), "steps": len(train)})

    def rel(a, b):
        return abs(a - b) / max(abs(b), 1e-30)

    # The logged training losses of each cached run against the online run of the same seed (every step).
    equality = []
    for name in names[1:]:
        for seed in grid["seeds"]:
            on, off = losses[("online", seed)], losses[(name, seed)]
            assert [r["step"] for r in on] == [r["step"] for r in off]
            lr = [rel(b["loss"], a["loss"]) for a, b in zip(on, off)]
            gr = [rel(b["grad_norm"], a["grad_norm"]) for a, b in zip(on, off)]
            equality.append({"setting": name, "seed": seed, "steps": len(lr), "loss_max_rel_diff": max(lr),
                             "loss_first_step_rel_diff": lr[0], "grad_norm_max_rel_diff": max(gr)})
    meta = {"device": device_name("cpu"), "git": git_sha(), "threads": threads, "sweep_seconds": sweep_s,
            "student": student, "caches": built}
    with open(os.path.join(out_dir, "offline_quality.json"), "w", encoding="utf-8") as f:
        json.dump({"runs": runs, "loss_equality": equality, "meta": meta, "grid": grid}, f, indent=1)
    with open(os.path.join(out_dir, "runs.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(runs[0]))
        for r in runs:
            w.writerow([repr(v) if isinstance(v, float) else v for v in r.values()])
    import statistics

    lines = [res["table"], "", "mean ± sample standard deviation (n − 1) over seeds; test split (20 examples) for the "
             "generation metrics, validation (20 examples) for KL and CE. A topk run's own val KL is measured against "
             "its cache's renormalised top-k teacher; the column 'val KL (full teacher)' below measures every final "
             "student against the full teacher (through the exact hidden cache).", "",
             "| setting | val KL(teacher‖student), full teacher |", "|---|---|"]
    for name in names:
        v = [r["val_kl_full_teacher"] for r in runs if r["setting"] == name]
        lines.append(f"| {name} | {statistics.mean(v):.4f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.4f} |")
    lines += ["", "Per run:", "", "| setting | seed | test ROUGE-L | val KL (run's own eval) | val KL (full teacher) | "
              "val CE | train s (wall) |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['setting']} | {r['seed']} | {r['rouge_l']:.2f} | {r['val_kl']:.4f} | "
                     f"{r['val_kl_full_teacher']:.4f} | {r['val_ce']:.4f} | {r['train_seconds']:.0f} |")
    lines += ["", "Logged training losses of each cached run vs the online run of the same seed (every step):", "",
              "| setting | seed | steps | max rel. diff of loss | step 1 | max rel. diff of grad norm |",
              "|---|---|---|---|---|---|"]
    for e in equality:
        lines.append(f"| {e['setting']} | {e['seed']} | {e['steps']} | {e['loss_max_rel_diff']:.2e} | "
                     f"{e['loss_first_step_rel_diff']:.2e} | {e['grad_norm_max_rel_diff']:.2e} |")
    lines += ["", f"{meta['device']}, {threads} threads, code {meta['git']}; caches: " +
              ", ".join(f"{k} {v['bytes_per_token']:.0f} B/token ({v['tokens']} tokens, {v['seconds']:.0f} s)"
                        for k, v in built.items()) + f"; sweep {sweep_s:.0f} s."]
    with open(os.path.join(out_dir, "offline_quality.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def write_profile(a) -> None:
    """Per part of a step: median over the timed steps of process CPU seconds (and wall seconds), per mode and
    thread count; the ceiling of a hidden cache = the online step without the teacher's body forward."""
    import csv

    from common import RESULTS_DIR, device_name, git_sha  # noqa: E402

    path = os.path.join(RESULTS_DIR, "cpu-offline-profile.csv")
    rows = []
    for threads in (1, 2):
        res = {}
        for mode, k in (("online", 0), ("hidden", 0), ("topk", 64)):
            r = _run(["--worker", "profile", "--mode", mode, "--k", str(k), "--steps", str(a.steps), "--work", a.work,
                      "--n-train", str(a.n_train), "--threads", str(threads)])
            res[r["mode"]] = r
            print(threads, r["mode"], r["median_total"], flush=True)
        on = res["online"]["median"]
        ceiling_cpu = res["online"]["median_total"][1] / (res["online"]["median_total"][1] -
                                                          on["teacher body forward"][1])
        for name, r in res.items():
            for part, (w, c) in list(r["median"].items()) + [("step (median of the totals)", r["median_total"])]:
                rows.append([threads, name, part, f"{c:.4f}", f"{w:.4f}", r["steps"]])
            rows.append([threads, name, "speedup vs online (CPU medians)",
                         f"{res['online']['median_total'][1] / r['median_total'][1]:.3f}", "", r["steps"]])
        rows.append([threads, "hidden ceiling", "online step / (online step - teacher body forward)", f"{ceiling_cpu:.3f}",
                     "", a.steps])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["threads", "mode", "part", "cpu_s_median", "wall_s_median", "steps", "device", "git", "note"])
        for r in rows:
            w.writerow(r + [device_name("cpu"), git_sha(), "median over the timed steps after 1 warm-up; "
                            "shared machine: process CPU time is the steadier column"])
    print("wrote " + path)


def _run(args) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, os.path.abspath(__file__)] + args, capture_output=True, text=True, env=env)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"bench_offline {args}: no result\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-train", type=int, default=32, help="demo training examples cached")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per mode")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", choices=["build", "train", "error", "profile"])
    ap.add_argument("--work", help="working directory; with built.json in it (a previous run) the caches are reused")
    ap.add_argument("--mode", default="online")
    ap.add_argument("--k", type=int, default=0)
    ap.add_argument("--op-only", action="store_true",
                    help="only the loss-op timing (no models): bench/results/cpu-topk-op.csv")
    ap.add_argument("--op-reps", type=int, default=5, help="timed calls per op-timing row")
    ap.add_argument("--quality", action="store_true",
                    help="student quality from a cache vs online: a sweep of online / hidden / topk64 x seeds "
                         "(bench/results/offline-quality/)")
    ap.add_argument("--student", help="--quality: an SFT-warmed student directory (e.g. the loss study's sft/); "
                                      "default: run the study's SFT warm start first")
    ap.add_argument("--seeds", default="0,1,2", help="--quality: seeds")
    ap.add_argument("--profile", action="store_true",
                    help="the step cut into its parts, online vs hidden vs topk64 (bench/results/cpu-offline-profile.csv; "
                         "needs --work with the caches of a previous run)")
    a = ap.parse_args()
    if a.profile:
        return write_profile(a)
    if a.quality:
        work = a.work or tempfile.mkdtemp(prefix="amid-offline-quality-")
        return quality(work, os.path.join(HERE, "results", "offline-quality"), a.student,
                       [int(x) for x in a.seeds.split(",")], a.threads)
    if a.op_only:
        rows = op_timing(a.threads, a.op_reps)
        print("wrote " + _write_op_csv(rows, a.threads, 256, 49152, a.op_reps))
        return None
    if a.worker == "build":
        return build(a.work, a.n_train, a.threads)
    if a.worker == "error":
        return error(a.work, a.n_train, a.threads)
    if a.worker == "train":
        return train(a.work, a.n_train, a.mode, a.k, a.steps, a.threads)
    if a.worker == "profile":
        return profile(a.work, a.n_train, a.mode, a.k, a.steps, a.threads)

    from common import RESULTS_DIR, device_name, git_sha  # noqa: E402

    work = a.work or tempfile.mkdtemp(prefix="amid-bench-offline-")
    common = ["--work", work, "--n-train", str(a.n_train), "--threads", str(a.threads)]
    t0 = time.perf_counter()
    built_path = os.path.join(work, "built.json")
    if os.path.isfile(built_path):
        built = json.load(open(built_path))
    else:
        built = _run(["--worker", "build"] + common)
        json.dump(built, open(built_path, "w"))
    print(f"caches built in {time.perf_counter() - t0:.0f} s ({work})", flush=True)
    err_path = os.path.join(work, "error.json")
    if not os.path.isfile(err_path):
        json.dump(_run(["--worker", "error"] + common), open(err_path, "w"))
    built.update(json.load(open(err_path)))
    rows = []
    for mode, k in MODES:
        r = _run(["--worker", "train", "--mode", mode, "--k", str(k or 0), "--steps", str(a.steps)] + common)
        r.update(built.get(r["mode"], {}))
        rows.append(r)
        print(r, flush=True)
    import csv

    os.makedirs(RESULTS_DIR, exist_ok=True)
    meta = {"device": device_name("cpu"), "git": git_sha()}
    # The default (2 threads) is cpu-offline.csv; another thread count gets its own file.
    path = os.path.join(RESULTS_DIR, "cpu-offline.csv" if a.threads == 2 else f"cpu-offline-{a.threads}thread.csv")
    base = rows[0]["step_s_min"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        # The best step (after one warm-up) is the headline: on a shared machine the means mostly measure
        # the other jobs (the same run repeated gave online means from 5 to 15 s for a best of 1.0 s).
        w.writerow(["mode", "step_s_min", "speedup_min", "step_s", "step_cpu_s_min", "peak_rss_mb", "bytes_per_token",
                    "cache_build_s", "cached_tokens", "steps", "device", "git", "threads", "note"])
        for r in rows:
            w.writerow([r["mode"], f"{r['step_s_min']:.3f}", f"{base / r['step_s_min']:.2f}", f"{r['step_s']:.3f}",
                        f"{r['step_cpu_s_min']:.3f}", f"{r['peak_rss_mb']:.0f}",
                        f"{r['bytes_per_token']:.0f}" if "bytes_per_token" in r else "",
                        f"{r['cache_build_s']:.1f}" if "cache_build_s" in r else "", r.get("tokens", ""), r["steps"],
                        meta["device"], meta["git"], a.threads,
                        f"best of {r['steps']} steps after 1 warm-up; means are distorted by other jobs on the machine"])
    epath = os.path.join(RESULTS_DIR, "cpu-topk-error.csv")
    with open(epath, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["k", "tail", "logprobs", "V", "rows", "loss_rel_err", "grad_rel_err", "teacher_tail_mass_mean"])
        for e in built["topk_error"]:
            w.writerow([e["k"], e["tail"], e["logprobs"], e["V"], e["rows"], f"{e['loss_rel_err']:.3e}", f"{e['grad_rel_err']:.3e}",
                        f"{e['teacher_tail_mass_mean']:.3e}"])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for tl in ("bucket", "renorm"):
            es = [e for e in built["topk_error"] if e["tail"] == tl and e["logprobs"] == "float16"]
            ax.loglog([e["k"] for e in es], [e["loss_rel_err"] for e in es], "o-", label=f"{tl}: loss")
            ax.loglog([e["k"] for e in es], [e["grad_rel_err"] for e in es], "s--", label=f"{tl}: gradient")
        ax.set_xlabel("k (teacher tokens kept)")
        ax.set_ylabel("relative error vs exact")
        ax.set_title(f"amid_loss_topk (fp16 log-probs) vs exact, V = {built['n_vocab']}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS_DIR, "cpu-topk-error.png"), dpi=110)
    except ImportError:
        pass
    print(f"wrote {path} and {epath} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
