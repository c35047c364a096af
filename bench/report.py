"""Markdown tables for the README from the committed benchmark CSVs (bench/results/*.csv).

    python bench/report.py            # one table per amid_loss / fused_linear CSV
    python bench/report.py A.csv ...  # those CSVs only
    python bench/report.py --cuda-headline bench/results/cuda-nvidia-h200-amid_loss.csv   # the README's GPU table
"""
from __future__ import annotations

import csv
import glob
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _f(x: float, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _ms(t: float) -> str:
    return f"{t:.0f}" if t >= 100 else f"{t:.1f}" if t >= 10 else f"{t:.3f}"


def amid_loss_table(rows) -> str:
    """One line per row; "× copy" is the time over the read-2-write-1 copy of the same shape (the
    floor; the CUDA target is ≤ 1.3), "vs eager" the eager official formula's time over this one
    (same setting and shape), "× gradient" the peak extra memory over the gradient's size."""
    out = ["| setting | N × V | dtype | provider | fwd+bwd ms (p50) | × copy | vs eager | peak extra MB | × gradient |",
           "|---|---|---|---|---|---|---|---|---|"]
    eager = {(r["setting"], r["N"], r["V"]): float(r["time_ms_p50"]) for r in rows if r["provider"] == "eager"}
    copy = {(r["N"], r["V"]): float(r["time_ms_p50"]) for r in rows if r["provider"] == "copy_r2w1"}
    for r in rows:
        t = float(r["time_ms_p50"])
        e = eager.get((r["setting"], r["N"], r["V"]))
        c = copy.get((r["N"], r["V"]))
        grad = float(r["grad_mb"]) if r["grad_mb"] else 0.0
        extra = float(r["peak_extra_mb"])
        out.append(f"| {r['setting'] or '-'} | {r['N']} × {r['V']} | {r['dtype']} | {r['provider']} | {_ms(t)} | "
                   f"{_f(t / c if c else None, '.2f')} | {_f(e / t if e else None, '.1f')}"
                   f"{'×' if e else ''} | {extra:.0f} | {_f(extra / grad if grad else None, '.2f')} |")
    return "\n".join(out)


def cpu_amid_loss_table(rows) -> str:
    """CPU rows with process CPU time (bench_amid_loss.py --device cpu): the speed-ups are ratios of CPU
    time (the steadier measure on a shared machine), against eager and torch.compile of the same setting."""
    out = ["| setting | provider | CPU ms (p50) | threads | wall ms (p50) | vs eager | vs torch.compile | "
           "peak extra MB | × gradient |",
           "|---|---|---|---|---|---|---|---|---|"]
    cpu = {(r["setting"], r["provider"]): float(r["cpu_time_ms_p50"]) for r in rows}
    for r in rows:
        t = float(r["cpu_time_ms_p50"])
        e, c = cpu.get((r["setting"], "eager")), cpu.get((r["setting"], "compile"))
        grad = float(r["grad_mb"]) if r["grad_mb"] else 0.0
        extra = float(r["peak_extra_mb"])
        out.append(f"| {r['setting']} | {r['provider']} | {_ms(t)} | {r['threads']} | {_ms(float(r['time_ms_p50']))} | "
                   f"{_f(e / t if e else None, '.1f')}× | {_f(c / t if c else None, '.1f')}× | {extra:.0f} | "
                   f"{_f(extra / grad if grad else None, '.2f')} |")
    return "\n".join(out)


def fused_linear_table(rows) -> str:
    out = ["| provider | N | H | V | dtype | chunk | time ms | × gemms | peak extra MB | logits MB (unfused) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r.get("ratio_vs_gemms") or "-"
        out.append(f"| {r['provider']} | {r['N']} | {r['H']} | {r['V']} | {r['dtype']} | {r.get('chunk_size') or '-'} | "
                   f"{_ms(float(r['time_ms']))} | {ratio} | {float(r['peak_extra_mb']):.0f} | {float(r['logits_mb']):.0f} |")
    return "\n".join(out)


def cuda_headline_table(rows) -> str:
    """The README's GPU table: per shape, the copy floor, amid's kl/pr (and its multiple of the floor), the baselines
    measured in the same run (torch.compile, Liger's KL-div and JSD, eager) and a few other amid losses, fwd + bwd
    medians in ms; then the peak extra memory over the gradient's size."""
    def cell(shape, provider, setting=None):
        for r in rows:
            if (r["N"], r["V"]) == shape and r["provider"] == provider and (setting is None or r["setting"] == setting):
                return r
        return None

    def ms(r):
        return _ms(float(r["time_ms_p50"])) if r else "-"

    def mem(r):
        return f"{float(r['peak_extra_mb']) / float(r['grad_mb']):.1f}" if r and r["grad_mb"] else "-"

    head = "kl/pr alpha=0.5 lam=0.5"
    out = ["| N × V (bf16) | copy floor ms | amid kl/pr | torch.compile | Liger KLDiv | Liger JSD | eager | amid kl/rq | "
           "amid ab/pr | amid kl/pr α=1 | peak extra, × gradient: amid / compile / Liger / eager |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    shapes = list(dict.fromkeys((r["N"], r["V"]) for r in rows))
    for shape in shapes:
        copy, amid, comp = cell(shape, "copy_r2w1"), cell(shape, "amid", head), cell(shape, "compile", head)
        eager, lk, lj = cell(shape, "eager", head), cell(shape, "liger_kldiv"), cell(shape, "liger_jsd")
        t = float(amid["time_ms_p50"]) if amid else None
        amid_s = f"**{ms(amid)}** ({t / float(copy['time_ms_p50']):.1f}× copy)" if amid and copy else ms(amid)
        comp_s = f"{ms(comp)} ({float(comp['time_ms_p50']) / t:.2f}× amid)" if comp and t else ms(comp)
        out.append(f"| {shape[0]} × {shape[1]} | {ms(copy)} | {amid_s} | {comp_s} | {ms(lk)} | {ms(lj)} | {ms(eager)} | "
                   f"{ms(cell(shape, 'amid', 'kl/rq alpha=0.5 lam=0.5'))} | {ms(cell(shape, 'amid', 'ab/pr alpha=0.5 lam=0.5'))} | "
                   f"{ms(cell(shape, 'amid', 'kl/pr alpha=1 lam=0.5'))} | {mem(amid)} / {mem(comp)} / {mem(lk)} / {mem(eager)} |")
    return "\n".join(out)


def main() -> None:
    if sys.argv[1:2] == ["--cuda-headline"]:
        print(cuda_headline_table(_rows(sys.argv[2])))
        return
    # The CSVs given, else every amid_loss / fused_linear benchmark CSV (the other CSVs have their own columns).
    paths = sys.argv[1:] or sorted(p for pat in ("*-amid_loss*.csv", "*-fused_linear*.csv")
                                   for p in glob.glob(os.path.join(HERE, "results", pat)))
    for path in paths:
        rows = _rows(path)
        if not rows:
            continue
        print(f"### {os.path.basename(path)} ({rows[0]['device_name']}, torch {rows[0]['torch_version']}, "
              f"amid {rows[0]['amid_version']} @ {rows[0]['git_sha']}, {rows[0]['timestamp']})\n")
        if "amid_loss" in path:
            print(cpu_amid_loss_table(rows) if rows[0].get("cpu_time_ms_p50") else amid_loss_table(rows))
        else:
            print(fused_linear_table(rows))
        print()


if __name__ == "__main__":
    sys.exit(main())
