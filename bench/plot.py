"""PNG figures from the benchmark CSVs: bench/results/<name>.csv -> bench/results/<name>.png.

    python bench/plot.py            # every *-amid_loss.csv and *-fused_linear.csv in bench/results
For amid_loss CSVs: time per provider (log scale) for each shape, headline setting; for fused_linear
CSVs: time and peak extra memory per provider.
"""
from __future__ import annotations

import csv
import glob
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def plot_amid_loss(rows, path):
    shapes = sorted({(int(r["N"]), int(r["V"])) for r in rows}, key=lambda x: x[0] * x[1])
    # The headline setting is the first one measured (the copy kernel and Liger rows have none).
    setting = next((r["setting"] for r in rows if r["setting"]), "")
    headline = [r for r in rows if r["setting"] in ("", setting)]
    providers = sorted({r["provider"] for r in headline}, key=lambda p: ("copy" not in p, p != "amid", p))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(providers), 1)
    for k, prov in enumerate(providers):
        xs, ts, ms = [], [], []
        for i, shp in enumerate(shapes):
            hit = [r for r in headline if r["provider"] == prov and (int(r["N"]), int(r["V"])) == shp]
            if hit:
                xs.append(i + k * width)
                ts.append(float(hit[0].get("cpu_time_ms_p50") or hit[0]["time_ms_p50"]))
                ms.append(float(hit[0]["peak_extra_mb"]))
        ax_t.bar(xs, ts, width, label=prov)
        ax_m.bar(xs, ms, width, label=prov)
    what = "CPU time" if rows[0].get("cpu_time_ms_p50") else "time"
    for ax, title in ((ax_t, f"forward + backward, {what}, ms (log)"), (ax_m, "peak extra memory, MB (log)")):
        ax.set_yscale("log")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))])
        ax.set_xticklabels([f"{n}x{v}" for n, v in shapes])
        ax.set_title(title)
    ax_t.legend(fontsize=8)
    fig.suptitle(f"AMiD loss, {rows[0]['dtype']}, {setting} on {rows[0]['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_fused_linear(rows, path):
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    ns = sorted({int(r["N"]) for r in rows})
    providers = sorted({r["provider"] for r in rows})
    width = 0.8 / max(len(providers), 1)
    for k, prov in enumerate(providers):
        pts = [(ns.index(int(r["N"])), float(r["time_ms"]), float(r["peak_extra_mb"])) for r in rows
               if r["provider"] == prov]
        ax_t.bar([p[0] + k * width for p in pts], [p[1] for p in pts], width, label=prov)
        ax_m.bar([p[0] + k * width for p in pts], [p[2] for p in pts], width, label=prov)
    for ax, title in ((ax_t, "forward + backward, ms"), (ax_m, "peak extra memory, MB")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ns))])
        ax.set_xticklabels([f"N={n}" for n in ns])
        ax.set_title(title)
    ax_t.legend(fontsize=8)
    fig.suptitle(f"fused linear + AMiD, H={rows[0]['H']}, V={rows[0]['V']}, {rows[0]['dtype']} on {rows[0]['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    paths = glob.glob(os.path.join(HERE, "results", "*-amid_loss.csv"))
    paths += glob.glob(os.path.join(HERE, "results", "*-fused_linear.csv"))
    for path in sorted(paths):  # (the other CSVs have their own scripts' plots)
        with open(path) as f:
            rows = list(csv.DictReader(f))
        if not rows:
            continue
        out = path[:-4] + ".png"
        (plot_fused_linear if "fused_linear" in path else plot_amid_loss)(rows, out)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
