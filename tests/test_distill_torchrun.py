"""amid-distill under torchrun (2 CPU processes, gloo): DDP and FSDP match one process on the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402
from test_distill import make_model, make_teacher, make_tokenizer, train_records, write_data  # noqa: E402

import amid  # noqa: E402
from amid.distill import cli as distill_cli  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with the gloo backend")


@pytest.fixture(scope="module")
def run_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    tok = make_tokenizer()
    teacher = make_teacher(tok)
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    student = make_model(len(tok), layers=1, seed=5)
    student.save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    paths = write_data(str(root / "data"), n_train=32)
    cfg = {"teacher": str(root / "teacher"), "student": str(root / "student"), "train_file": paths["train"],
           "validation_file": paths["validation"], "test_file": paths["test"], "max_steps": 3, "lr": 1e-2,
           "kd_weight": 0.5, "alpha": 0.5, "lam": 0.2, "divergence": "ab", "order": "pr", "max_length": 48,
           "eval_max_new_tokens": 6, "eval_batch_size": 3, "plots": False, "progress": False, "seed": 0,
           "device": "cpu",
           # Student-generated batches too: sampling is seeded per global-batch slot, so it matches as well.
           "student_gen": True, "sgo_init_threshold": 0.6, "sgo_capacity": 8, "gen_max_new_tokens": 5}
    with open(root / "cfg.json", "w") as f:
        json.dump(cfg, f)
    return root


def _env():
    # The workers import the amid under test (a script's own folder, not the working directory, starts
    # sys.path, and another checkout may be installed).
    root = os.path.dirname(os.path.dirname(os.path.abspath(amid.__file__)))
    path = os.pathsep.join(x for x in (root, os.environ.get("PYTHONPATH")) if x)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=path)
    env.pop("WORLD_SIZE", None)
    return env


def _torchrun(root, out, *extra, script=None, env=None, expect_ok=True):
    """Runs amid-distill (or `script`, a file) under torchrun with 2 processes; returns the output dir
    (and the completed process when expect_ok is False)."""
    prog = [str(script)] if script else ["-m", "amid.distill.cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *prog,
           "--config", str(root / "cfg.json"), "--output-dir", str(root / out),
           "--micro-batch-size", "2", "--grad-accum-steps", "1", *extra]
    res = subprocess.run(cmd, env=dict(_env(), **(env or {})), capture_output=True, text=True, timeout=600)
    if not expect_ok:
        return root / out, res
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert "terminate called" not in res.stderr, res.stderr[-6000:]
    return root / out


# Runs the CLI, then checks that the process group was really torn down before the process exits:
# no gloo thread may be left (a group kept alive by a leftover reference is torn down during
# interpreter shutdown instead, racing the peer's exit: a finished run then aborted now and then
# with "terminate called without an active exception", SIGABRT). Exit code 3 flags a leftover.
_CLEAN_EXIT = """
import os, sys
from amid.distill import cli
rc = cli.main(sys.argv[1:])
task = "/proc/self/task"
if os.path.isdir(task):
    names = [open(os.path.join(task, t, "comm")).read().strip() for t in os.listdir(task)]
    left = [n for n in names if "gloo" in n]
    if left:
        print(f"process group still alive after amid-distill returned: threads {left}", file=sys.stderr)
        sys.exit(3)
sys.exit(rc)
"""


def _torchrun_clean(root, out, *extra):
    (root / "clean_exit.py").write_text(_CLEAN_EXIT)
    return _torchrun(root, out, *extra, script=root / "clean_exit.py")


@pytest.fixture(scope="module")
def single(run_setup):
    root = run_setup
    out = root / "single"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert distill_cli.main(["--config", str(root / "cfg.json"), "--output-dir", str(out),
                                 "--micro-batch-size", "2", "--grad-accum-steps", "2"]) == 0
    finally:
        torch.set_num_threads(n)
    return out


def _compare(a, b):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    la, lb = train_records(str(a)), train_records(str(b))
    assert [r["step"] for r in lb] == [1, 2, 3]
    assert [r["batches"] for r in lb] == [r["batches"] for r in la]
    assert sum(r["batches"]["generate"] for r in la) >= 1
    assert [r["loss"] for r in lb] == pytest.approx([r["loss"] for r in la], rel=1e-4)
    # The run really trained: the weights moved away from the initial student.
    init = load_file(str(a.parent / "student" / "model.safetensors"))
    moved = max(float((wa[k] - init[k]).abs().max()) for k in init if k in wa)
    assert moved > 1e-3
    sa, sb = (json.load(open(x / "summary.json")) for x in (a, b))
    assert [r["model"] for r in sb["rows"]] == ["teacher", "student (before)", "student (after)"]
    assert [r["val_ce"] for r in sb["rows"]] == pytest.approx([r["val_ce"] for r in sa["rows"]], rel=1e-4)


def _run_kind(out):
    s = json.load(open(out / "summary.json"))
    return s["strategy"], s["world_size"]


def test_ddp_two_processes_match_one_process(run_setup, single):
    out = _torchrun_clean(run_setup, "ddp")
    assert _run_kind(single) == ("none", 1) and _run_kind(out) == ("ddp", 2)
    _compare(single, out)


def test_fsdp_two_processes_match_one_process(run_setup, single):
    out = _torchrun_clean(run_setup, "fsdp", "--strategy", "fsdp")
    assert _run_kind(out) == ("fsdp", 2)
    _compare(single, out)


def test_fsdp_with_a_sharded_teacher_matches_one_process(run_setup, single):
    # The teacher's layers sharded over the ranks (forward only; no cache, synced generation): the
    # gathered weights are the same, so the run equals the one-process run with a whole teacher.
    out = _torchrun_clean(run_setup, "fsdp_teacher", "--strategy", "fsdp", "--shard-teacher")
    assert _run_kind(out) == ("fsdp", 2)
    _compare(single, out)
    # Each rank holds the whole embeddings and head plus half of the decoder layers (and final norm).
    whole = json.load(open(single / "summary.json"))["per_rank"][0]["teacher_params"]
    per_rank = [r["teacher_params"] for r in json.load(open(out / "summary.json"))["per_rank"]]
    teacher = make_teacher(make_tokenizer())
    sharded = sum(p.numel() for m in (teacher.model.layers, teacher.model.norm) for p in m.parameters())
    assert per_rank == [whole - sharded // 2] * 2, (per_rank, whole, sharded)
    # Loaded rank by rank: each rank read from the safetensors file only the rows it keeps (the whole
    # teacher was never materialised on any rank).
    load = json.load(open(out / "summary.json"))["teacher_load"]
    assert [x["mode"] for x in load] == ["rank-local (safetensors)"] * 2
    assert [x["teacher_elements_read"] for x in load] == per_rank


def test_sharded_teacher_from_a_bin_file_with_a_built_student_matches_one_process(run_setup):
    # A teacher that cannot be read row by row (pytorch_model.bin, like GGUF): rank 0 loads it and
    # broadcasts tensor by tensor. The student is built from the teacher's layers (read the same
    # way; the tied head stays tied). Both must equal the one-process run that loads the teacher whole.
    root = run_setup
    tok = make_tokenizer()
    teacher = make_model(len(tok), layers=2, seed=3, tie=True)  # a tied head, as SmolLM2's
    bin_dir = root / "teacher_bin"
    teacher.config.save_pretrained(bin_dir)
    torch.save(teacher.state_dict(), bin_dir / "pytorch_model.bin")
    tok.save_pretrained(bin_dir)
    flags = ["--teacher", str(bin_dir), "--student", "none", "--student-num-layers", "1", "--max-steps", "2",
             "--test-file", "none", "--no-student-gen", "--no-eval-teacher"]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert distill_cli.main(["--config", str(root / "cfg.json"), "--output-dir", str(root / "bin_single"),
                                 "--micro-batch-size", "2", "--grad-accum-steps", "2", *flags]) == 0
    finally:
        torch.set_num_threads(n)
    out = _torchrun(root, "bin_sharded", "--strategy", "fsdp", "--shard-teacher", *flags)
    a, b = root / "bin_single", out
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    # The FSDP run's full state dict may spell out the tied head; it must then equal the embeddings
    # (an untied head would have trained apart from them).
    if "lm_head.weight" in wb and "lm_head.weight" not in wa:
        torch.testing.assert_close(wb.pop("lm_head.weight"), wb["model.embed_tokens.weight"], rtol=0, atol=0)
    assert wa.keys() == wb.keys() and len(wa) > 0
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    la, lb = train_records(str(a)), train_records(str(b))
    assert [r["step"] for r in lb] == [1, 2]
    assert [r["loss"] for r in lb] == pytest.approx([r["loss"] for r in la], rel=1e-4)
    s = json.load(open(b / "summary.json"))
    assert [x["mode"] for x in s["teacher_load"]] == ["rank 0 loads, broadcast"] * 2
    assert [x["teacher_elements_read"] for x in s["teacher_load"]] == [r["teacher_params"] for r in s["per_rank"]]
    assert all(x["student_elements_read"] > 0 for x in s["teacher_load"])


# A real kill: every rank SIGKILLs itself right after the checkpoint of step 2 (no clean-up, no
# exit handlers, torchrun's agent sees the workers die); `--resume` under torchrun then finishes the
# run, which must equal the uninterrupted one.
_KILLER = """
import os, signal, sys
from amid.distill import cli, trainer
_save = trainer.Distiller.save_checkpoint
def _save_then_die(self):
    path = _save(self)
    if self.step == int(os.environ["AMID_TEST_KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return path
trainer.Distiller.save_checkpoint = _save_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


def test_ddp_run_killed_and_resumed_matches_one_process(run_setup, single):
    root = run_setup
    (root / "killer.py").write_text(_KILLER)
    out, res = _torchrun(root, "ddp_killed", "--save-every", "1", script=root / "killer.py",
                         env={"AMID_TEST_KILL_AT_STEP": "2"}, expect_ok=False)
    assert res.returncode != 0, "the run was meant to be killed"
    assert "SIGKILL" in res.stderr or "Signals.SIGKILL" in res.stderr or "-9" in res.stderr, res.stderr[-3000:]
    assert not (out / "model.safetensors").exists()  # the final model was never written
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    _, res = _torchrun(root, "ddp_killed", "--save-every", "1", "--resume", expect_ok=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert "resumed from" in res.stdout and "at step 2/3" in res.stdout, res.stdout[-3000:]
    assert _run_kind(out) == ("ddp", 2)
    _compare(single, out)
