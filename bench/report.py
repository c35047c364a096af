"""Markdown tables for the README from the committed benchmark CSVs (bench/results/*.csv).

    python bench/report.py            # prints one table per CSV
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


def amid_loss_table(rows) -> str:
    out = ["| setting | N × V | dtype | provider | fwd+bwd ms (p50) | speed-up vs eager | peak extra MB | × gradient |",
           "|---|---|---|---|---|---|---|---|"]
    eager = {(r["setting"], r["N"], r["V"]): float(r["time_ms_p50"]) for r in rows if r["provider"] == "eager"}
    for r in rows:
        e = eager.get((r["setting"], r["N"], r["V"]))
        t = float(r["time_ms_p50"])
        grad = float(r["grad_mb"]) if r["grad_mb"] else 0.0
        extra = float(r["peak_extra_mb"])
        out.append(f"| {r['setting'] or '-'} | {r['N']} × {r['V']} | {r['dtype']} | {r['provider']} | {t:.1f} | "
                   f"{(e / t if e else float('nan')):.1f}× | {extra:.0f} | {extra / grad if grad else float('nan'):.2f} |")
    return "\n".join(out)


def fused_linear_table(rows) -> str:
    out = ["| provider | N | H | V | dtype | chunk | time ms | peak extra MB | logits MB (unfused) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['provider']} | {r['N']} | {r['H']} | {r['V']} | {r['dtype']} | {r.get('chunk_size') or '-'} | "
                   f"{float(r['time_ms']):.0f} | {float(r['peak_extra_mb']):.0f} | {float(r['logits_mb']):.0f} |")
    return "\n".join(out)


def main() -> None:
    for path in sorted(glob.glob(os.path.join(HERE, "results", "*.csv"))):
        rows = _rows(path)
        if not rows:
            continue
        print(f"### {os.path.basename(path)} ({rows[0]['device_name']}, torch {rows[0]['torch_version']}, "
              f"amid {rows[0]['amid_version']} @ {rows[0]['git_sha']}, {rows[0]['timestamp']})\n")
        print(amid_loss_table(rows) if "amid_loss" in path else fused_linear_table(rows))
        print()


if __name__ == "__main__":
    sys.exit(main())
