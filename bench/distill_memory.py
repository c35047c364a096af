"""Teacher memory per rank under torchrun (2 CPU processes, gloo, FSDP student): replicated float32 vs
bf16 vs the teacher's layers sharded (``shard_teacher``), for the demo teacher (SmolLM2-135M-Instruct)
and a synthetic larger Llama teacher with the same tokenizer.

    python bench/distill_memory.py [--out bench/results/cpu-distill_memory.csv]

Each configuration is a short real run (2 optimizer steps, no evaluation); the numbers come from the
run's summary.json: the teacher's parameters and MiB held by each rank (a shard counts its local
part), the process's peak resident memory and its resident memory at the end of the run (everything:
torch, transformers, student, optimizer), and how a sharded teacher was loaded: built on the meta
device, sharded, then each rank reads only its rows from the safetensors files ("rank-local"), or,
for a teacher that cannot be read row by row (the demo's GGUF file), rank 0 loads it whole and
scatters each rank's rows, tensor by tensor ("rank 0 loads, broadcast": rank 0's peak then includes
the whole teacher).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def synthetic_teacher(folder: str) -> str:
    """A random Llama (24 layers, hidden 768, ~245M parameters) with the demo teacher's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from amid.distill import models as M

    path = os.path.join(folder, "synthetic-teacher")
    if os.path.isdir(path):
        return path
    tok_dir, gguf = M.resolve_model_path("smollm2", None)
    tok = M.load_tokenizer(tok_dir, gguf)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=2048, num_hidden_layers=24,
                      num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run(teacher: str, dtype: str, sharded: bool, out: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "amid.distill.cli", "--demo", "--teacher", teacher, "--output-dir", out, "--strategy", "fsdp",
           "--teacher-dtype", dtype, "--max-steps", "2", "--micro-batch-size", "2", "--validation-file", "none",
           "--test-file", "none", "--no-eval-teacher", "--no-progress", "--no-plots", "--student-num-layers", "2",
           "--save-every", "0"]
    if sharded:
        cmd.append("--shard-teacher")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"distill_memory: run failed ({' '.join(cmd)}):\n{res.stderr[-4000:]}")
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cpu-distill_memory.csv"))
    ap.add_argument("--teachers", default="smollm2,synthetic")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.teachers.split(","):
            teacher = synthetic_teacher(tmp) if name == "synthetic" else name
            for dtype, sharded in (("float32", False), ("bf16", False), ("float32", True), ("bf16", True)):
                s = run(teacher, dtype, sharded, os.path.join(tmp, f"{name}-{dtype}-{sharded}"))
                for rank, r in enumerate(s["per_rank"]):
                    rows.append({"teacher": name, "teacher_dtype": dtype, "sharded": sharded, "rank": rank,
                                 "teacher_params": r["teacher_params"], "teacher_mib": round(r["teacher_mb"], 1),
                                 "peak_rss_mib": round(r["peak_rss_mb"], 1), "rss_end_mib": round(r["rss_mb"], 1),
                                 "load": (s["teacher_load"][rank]["mode"].split(" (")[0] if s.get("teacher_load")
                                          else "whole")})
                    print(rows[-1], flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
