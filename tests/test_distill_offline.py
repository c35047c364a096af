"""Offline distillation (issue 10): amid-distill cache-teacher, then training from the cache with no teacher model.

The 'hidden' cache stores the teacher's final hidden states and head, so training from it must equal
online distillation (float32: loss and gradients to 1e-6 relative).
"""
import json
import math
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from test_distill import (_one_thread, make_model, make_teacher, make_tokenizer, tiny_config,  # noqa: E402,F401
                         train_records)

import amid.topk  # noqa: E402
from amid.distill import ConfigError  # noqa: E402
from amid.distill.data import collate_train  # noqa: E402
from amid.distill import cli as distill_cli  # noqa: E402
from amid.distill.cache import INDEX_FILE, OfflineTeacher, cache_teacher  # noqa: E402
from amid.distill.trainer import Distiller  # noqa: E402


@pytest.fixture(scope="module")
def world():
    tok = make_tokenizer()
    return tok, make_teacher(tok)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("fused", [False, True])
def test_hidden_cache_equals_online(tmp_path, world, fused):
    tok, teacher = world
    cfg = tiny_config(tmp_path, kd_weight=0.6, alpha=0.3, lam=0.2, divergence="ab", order="rq", fused_linear=fused,
                      grad_accum_steps=2, micro_batch_size=3, eval_teacher=True, cache_teacher=False)
    cache = str(tmp_path / "cache")
    # Small shards: several per split, so lookups cross shard boundaries.
    summary = cache_teacher(cfg, cache, teacher=teacher, tokenizer=tok, shard_mb=0.02, batch_size=5, progress=False)
    assert summary["shards"] > 3 and summary["tokens"] > 0
    assert summary["bytes_per_token"] == pytest.approx(32 * 4, rel=0.2)  # H = 32 float32 values (+ offsets)
    online = Distiller(cfg.replace(output_dir=str(tmp_path / "on")), teacher=teacher, tokenizer=tok,
                       student=make_model(len(tok), layers=1, seed=5))
    offline = Distiller(cfg.replace(output_dir=str(tmp_path / "off"), teacher_cache=cache), tokenizer=tok,
                        student=make_model(len(tok), layers=1, seed=5))
    assert offline.offline is not None and not hasattr(offline.teacher, "model")  # no teacher model loaded
    # One accumulated step on uneven micro-batches (train split), loss and every gradient.
    idx = [[0, 7, 3], [11, 2]]
    res = {}
    for name, d in (("on", online), ("off", offline)):
        items = [[{"input_ids": d.train_set[i].input_ids, "labels": d.train_set[i].labels} for i in mb] for mb in idx]
        d.optimizer.zero_grad(set_to_none=True)
        sums = d._accumulate(items, [[("train", i) for i in mb] for mb in idx], ce_on=True)
        res[name] = (float(sums["loss"]), _grads(d.student))
    assert res["off"][0] == pytest.approx(res["on"][0], rel=1e-6)
    assert res["off"][1].keys() == res["on"][1].keys()
    for n, g in res["on"][1].items():
        assert _rel(res["off"][1][n], g) <= 1e-6, n
    # Whole runs (3 steps with accumulation, evaluation of teacher and student from the cached splits).
    for d in (online, offline):
        d.optimizer.zero_grad(set_to_none=True)
    on_cfg = cfg.replace(output_dir=str(tmp_path / "on2"), max_steps=3, eval_every=2)
    a = Distiller(on_cfg, teacher=teacher, tokenizer=tok, student=make_model(len(tok), layers=1, seed=5))
    b = Distiller(on_cfg.replace(output_dir=str(tmp_path / "off2"), teacher_cache=cache), tokenizer=tok,
                  student=make_model(len(tok), layers=1, seed=5))
    a.train()
    b.train()
    ra, rb = train_records(a.cfg.output_dir), train_records(b.cfg.output_dir)
    assert [r["loss"] for r in rb] == pytest.approx([r["loss"] for r in ra], rel=1e-5)
    for n, p in a.student.state_dict().items():
        torch.testing.assert_close(b.student.state_dict()[n], p, rtol=1e-5, atol=1e-6)
    evals = lambda d: sorted((r["phase"], r["model"], r["split"], r["kl"], r["ce"])  # noqa: E731
                             for r in map(json.loads, open(os.path.join(d, "metrics.jsonl"))) if r["type"] == "eval")
    ea, eb = evals(a.cfg.output_dir), evals(b.cfg.output_dir)
    assert [e[:3] for e in ea] == [e[:3] for e in eb]
    for x, y in zip(ea, eb):
        assert y[4] == pytest.approx(x[4], rel=1e-5) and (x[3] is None or y[3] == pytest.approx(x[3], rel=1e-5, abs=1e-7))


def test_cache_resume_from_checkpoint_and_student_from_cache(tmp_path, world):
    tok, teacher = world
    cfg = tiny_config(tmp_path, kd_weight=0.7, max_steps=4, save_every=2, eval_teacher=False, eval_every=0)
    cache = str(tmp_path / "cache")
    cache_teacher(cfg, cache, teacher=teacher, tokenizer=tok, progress=False)
    # No student in the config: the cache holds the student built from the teacher's layers.
    off = cfg.replace(teacher_cache=cache)
    full = Distiller(off.replace(output_dir=str(tmp_path / "full")))  # tokenizer from the cache too
    online = Distiller(cfg.replace(output_dir=str(tmp_path / "online")), teacher=teacher, tokenizer=tok)
    for n, p in online.student.state_dict().items():
        torch.testing.assert_close(full.student.state_dict()[n], p, rtol=0, atol=0)
    full.train()
    split = off.replace(output_dir=str(tmp_path / "split"))
    first = Distiller(split)
    assert first.train(stop_after=2) is None
    second = Distiller(split.replace(resume=True))
    assert second.step == 2
    second.train()
    for n, p in full.student.state_dict().items():
        torch.testing.assert_close(second.student.state_dict()[n], p, rtol=1e-5, atol=1e-6)
    # A config asking for another student than the cached one is refused, naming the field.
    with pytest.raises(ConfigError, match="'student_num_layers' differs"):
        Distiller(off.replace(output_dir=str(tmp_path / "x"), student_num_layers=2))


def test_cache_writing_is_resumable_and_atomic(tmp_path, world):
    tok, teacher = world
    cfg = tiny_config(tmp_path)
    ref = str(tmp_path / "ref")
    s_ref = cache_teacher(cfg, ref, teacher=teacher, tokenizer=tok, shard_mb=0.02, progress=False)
    cache = str(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        cache_teacher(cfg, cache, teacher=teacher, tokenizer=tok, shard_mb=0.02, progress=False, _stop_after_shards=2)
    assert not os.path.exists(os.path.join(cache, INDEX_FILE))
    assert not [f for f in os.listdir(cache) if ".tmp" in f]
    with pytest.raises(ConfigError, match="interrupted cache-teacher run"):
        OfflineTeacher.open(cache)
    s = cache_teacher(cfg, cache, teacher=teacher, tokenizer=tok, shard_mb=0.02, progress=False)
    assert s["shards_written"] == s_ref["shards"] - 2
    man = lambda d: json.load(open(os.path.join(d, INDEX_FILE)))["shards"]  # noqa: E731
    assert [(x["file"], x["sha256"]) for x in man(cache)] == [(x["file"], x["sha256"]) for x in man(ref)]
    # A full disk while writing a shard: one line, no partial file, and the same command continues.
    import safetensors.torch

    orig, calls = safetensors.torch.save_file, []

    def full_disk(tensors, path, metadata=None):
        if "-of-" not in os.path.basename(path):  # the head file is written; the first shard hits the full disk
            return orig(tensors, path, metadata=metadata)
        calls.append(path)
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    disk = str(tmp_path / "disk")
    safetensors.torch.save_file = full_disk
    try:
        with pytest.raises(ConfigError, match="failed \\(No space left on device\\); the 0 finished shards are kept"):
            cache_teacher(cfg, disk, teacher=teacher, tokenizer=tok, shard_mb=0.02, progress=False)
    finally:
        safetensors.torch.save_file = orig
    assert calls and not [f for f in os.listdir(disk) if ".tmp" in f or f.startswith("train-")]
    assert cache_teacher(cfg, disk, teacher=teacher, tokenizer=tok, shard_mb=0.02, progress=False)["shards_written"] \
        == s_ref["shards"]
    # A finished cache is left alone; one built for other options is refused.
    assert cache_teacher(cfg, cache, teacher=teacher, tokenizer=tok, shard_mb=0.02, progress=False)[
        "shards_written"] == 0
    with pytest.raises(ConfigError, match="holds a cache of another teacher, data or options"):
        cache_teacher(cfg.replace(max_length=40), cache, teacher=teacher, tokenizer=tok, shard_mb=0.02, progress=False)


def test_bad_caches_are_refused(tmp_path, world):
    tok, teacher = world
    cfg = tiny_config(tmp_path, eval_teacher=False)
    cache = str(tmp_path / "cache")
    cache_teacher(cfg, cache, teacher=teacher, tokenizer=tok, shard_mb=0.02, progress=False)
    student = lambda: make_model(len(tok), layers=1, seed=5)  # noqa: E731
    off = cfg.replace(teacher_cache=cache, output_dir=str(tmp_path / "o"))
    # Other data, another tokenizer, other data options, student generation.
    other = tiny_config(tmp_path / "other")
    with open(other.train_file, "a") as f:
        f.write(json.dumps({"prompt": "copy a b", "response": "a b"}) + "\n")
    with pytest.raises(ConfigError, match="field 'train_file' differs"):
        Distiller(off.replace(train_file=other.train_file), tokenizer=tok, student=student())
    tok2 = make_tokenizer(extra_words=["zz"])
    with pytest.raises(ConfigError, match="field 'tokenizer' differs"):
        Distiller(off, tokenizer=tok2, student=make_model(len(tok2), layers=1))
    with pytest.raises(ConfigError, match="field 'max_length' differs"):
        Distiller(off.replace(max_length=40), tokenizer=tok, student=student())
    with pytest.raises(ConfigError, match="student_gen needs a live teacher"):
        Distiller(off.replace(student_gen=True), tokenizer=tok, student=student())
    with pytest.raises(ConfigError, match="a teacher model object was passed too"):
        Distiller(off, teacher=teacher, tokenizer=tok, student=student())
    shards = sorted(x["file"] for x in json.load(open(os.path.join(cache, INDEX_FILE)))["shards"])
    victim = os.path.join(cache, shards[1])
    data = open(victim, "rb").read()
    # Corrupted (same size): found by its SHA-256 when the shard is first read.
    with open(victim, "r+b") as f:
        f.seek(len(data) - 3)
        f.write(bytes([data[-3] ^ 0xFF]))
    d = Distiller(off, tokenizer=tok, student=student())
    split, first = json.load(open(os.path.join(cache, INDEX_FILE)))["shards"][1]["split"], None
    for x in json.load(open(os.path.join(cache, INDEX_FILE)))["shards"]:
        if x["file"] == shards[1]:
            split, first = x["split"], x["first_example"]
    with pytest.raises(ConfigError, match=f"{shards[1]} does not match its SHA-256"):
        d.offline.hidden([(split, first)], torch.device("cpu"))
    # Truncated, missing: refused when the cache is opened.
    with open(victim, "wb") as f:
        f.write(data[:-10])
    with pytest.raises(ConfigError, match=f"{shards[1]} has {len(data) - 10} bytes, expected {len(data)}"):
        Distiller(off, tokenizer=tok, student=student())
    os.remove(victim)
    with pytest.raises(ConfigError, match=f"the shard .*{shards[1]} is missing"):
        Distiller(off, tokenizer=tok, student=student())
    with pytest.raises(ConfigError, match="index.json is missing"):
        Distiller(off.replace(teacher_cache=str(tmp_path)), tokenizer=tok, student=student())


def test_cli_two_command_flow(tmp_path, world, capsys):
    """CI: the documented flow on a tiny config: cache-teacher, then train from the cache."""
    tok, teacher = world
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    cfg = tiny_config(tmp_path, teacher=str(tmp_path / "teacher"), max_steps=2, eval_teacher=False, device="cpu")
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    cache = str(tmp_path / "cache")
    assert distill_cli.main(["cache-teacher", "--config", str(cfg_path), "--teacher-cache", cache, "--dtype",
                             "bfloat16", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "bytes/token" in out and "tokens/s" in out
    assert json.load(open(os.path.join(cache, INDEX_FILE)))["identity"]["store_dtype"] == "bfloat16"
    assert distill_cli.main(["--config", str(cfg_path), "--teacher-cache", cache]) == 0
    assert len(train_records(cfg.output_dir)) == 2
    assert os.path.isfile(os.path.join(cfg.output_dir, "model.safetensors"))
    # Errors are one line, exit 2.
    assert distill_cli.main(["--config", str(cfg_path), "--teacher-cache", str(tmp_path / "nope"), "--output-dir",
                             str(tmp_path / "out2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # The finished run's output directory is not reused for a new run.
    assert distill_cli.main(["--config", str(cfg_path), "--teacher-cache", cache]) == 2
    assert "already holds another run" in capsys.readouterr().err
    assert distill_cli.main(["cache-teacher", "--config", str(cfg_path)]) == 2


def test_topk_cache_training(tmp_path, world):
    tok, teacher = world
    v = len(tok)
    cfg = tiny_config(tmp_path, kd_weight=0.8, alpha=0.5, lam=0.2, cache_teacher=False, eval_teacher=True,
                      max_steps=2, eval_every=1)
    full = str(tmp_path / "full")  # k = V: the top-k teacher is the whole teacher, up to float16 rounding
    s = cache_teacher(cfg, full, mode="topk", k=v, teacher=teacher, tokenizer=tok, progress=False)
    assert s["bytes_per_token"] == pytest.approx(v * 6 + 4, rel=0.05)
    online = Distiller(cfg.replace(output_dir=str(tmp_path / "on")), teacher=teacher, tokenizer=tok,
                       student=make_model(v, layers=1, seed=5))
    res = {}
    for name, tail in (("online", None), ("bucket", "bucket"), ("renorm", "renorm")):
        d = online if tail is None else Distiller(
            cfg.replace(output_dir=str(tmp_path / name), teacher_cache=full, topk_tail=tail), tokenizer=tok,
            student=make_model(v, layers=1, seed=5))
        items = [{"input_ids": d.train_set[i].input_ids, "labels": d.train_set[i].labels} for i in range(5)]
        d.optimizer.zero_grad(set_to_none=True)
        sums = d._accumulate([items[:2], items[2:]], [[("train", i) for i in range(2)],
                                                      [("train", i) for i in range(2, 5)]], ce_on=True)
        res[name] = (float(sums["loss"]), _grads(d.student))
        # the tail's share is logged only from a top-k cache; with k = V there is no tail (up to the
        # float16 rounding of the cached log-probabilities)
        assert ("tail_teacher" in sums) == (tail is not None)
        if tail is not None:
            assert float(sums["tail_teacher"]) < 1e-2 and float(sums["tail_student"]) < 1e-6
    for name in ("bucket", "renorm"):
        assert res[name][0] == pytest.approx(res["online"][0], rel=2e-3)
        for n, g in res["online"][1].items():
            assert _rel(res[name][1][n], g) < 3e-2, (name, n)
    # A small k trains and evaluates (KL against the renormalised top-k teacher); no teacher evaluation.
    small = str(tmp_path / "small")
    cache_teacher(cfg, small, mode="topk", k=4, dtype="bfloat16", teacher=teacher, tokenizer=tok, progress=False)
    d = Distiller(cfg.replace(output_dir=str(tmp_path / "k4"), teacher_cache=small), tokenizer=tok,
                  student=make_model(v, layers=1, seed=5))
    # The tail's share (mean over kept tokens): the teacher's from the cache, the student's on the same tokens.
    items = [{"input_ids": d.train_set[i].input_ids, "labels": d.train_set[i].labels} for i in range(5)]
    keys = [("train", i) for i in range(5)]
    sums = d._accumulate([items], [keys], ce_on=True)
    d.optimizer.zero_grad(set_to_none=True)
    t_rows = d.offline.hidden(keys, d.device)
    assert float(sums["tail_teacher"]) == pytest.approx(float(t_rows["tail_logmass"].exp().mean()), rel=1e-5)
    b = collate_train(items, d.pad_id)
    with torch.no_grad():
        logits = d.engine(task="logits", input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                          row_mask=b["labels"][:, 1:] != -100)
    _t, s_share = amid.topk.topk_tail_mass(logits, t_rows["logprobs"], t_rows["indices"])
    assert float(sums["tail_student"]) == pytest.approx(float(s_share.mean()), rel=1e-4)
    assert 0.0 < float(sums["tail_teacher"]) < 1.0 and 0.0 < float(sums["tail_student"]) < 1.0
    d.train()
    recs = [json.loads(x) for x in open(os.path.join(d.cfg.output_dir, "metrics.jsonl"))]
    train = [r for r in recs if r["type"] == "train"]
    assert train and all(0.0 < r["topk_tail_teacher"] < 1.0 and 0.0 < r["topk_tail_student"] < 1.0 for r in train)
    assert all(r["model"] == "student" for r in recs if r["type"] == "eval")
    assert all(math.isfinite(r["loss"]) for r in recs if r["type"] == "train")
    assert all(math.isfinite(r["kl"]) for r in recs if r["type"] == "eval")
    with pytest.raises(ConfigError, match="needs temperature 1"):
        Distiller(cfg.replace(output_dir=str(tmp_path / "x"), teacher_cache=small, temperature=2.0), tokenizer=tok,
                  student=make_model(v, layers=1, seed=5))
    with pytest.raises(ConfigError, match="expected fused_linear false"):
        Distiller(cfg.replace(output_dir=str(tmp_path / "x"), teacher_cache=small, fused_linear=True), tokenizer=tok,
                  student=make_model(v, layers=1, seed=5))


# Runs amid-distill with the cache's reads recorded: every (split, example) whose rows a rank reads and
# every shard it opens (and checksums), written to $AMID_TEST_READS/rank<RANK>.json at the end.
_RECORD_READS = """
import json, os, sys
from amid.distill import cache, cli
reads = {"keys": [], "opened": []}
_rows, _shard = cache.OfflineTeacher.rows, cache.OfflineTeacher._shard
def rows(self, keys, name="hidden"):
    if name in ("hidden", "logprobs"):
        reads["keys"] += [[s, int(i)] for s, i in keys]
    return _rows(self, keys, name)
def shard(self, split, i):
    before = set(self._open)
    out = _shard(self, split, i)
    reads["opened"] += sorted(set(self._open) - before)
    return out
cache.OfflineTeacher.rows, cache.OfflineTeacher._shard = rows, shard
rc = cli.main(sys.argv[1:])
with open(os.path.join(os.environ["AMID_TEST_READS"], "rank%s.json" % os.environ.get("RANK", "0")), "w") as f:
    json.dump(reads, f)
sys.exit(rc)
"""


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with the gloo backend")
def test_ddp_from_cache_matches_one_process(tmp_path, world):
    """torchrun, 2 processes (gloo): each rank reads only its own samples (and only the shards holding them) from
    the cache, the two ranks together exactly the global batches; the run equals one process."""
    from safetensors.torch import load_file
    from test_distill_torchrun import _torchrun

    from amid.distill.data import StepSampler
    from test_distill import write_data

    tok, teacher = world
    root = tmp_path
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    student = make_model(len(tok), layers=1, seed=5)
    student.save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    paths = write_data(str(root / "data"), n_train=16)
    cfg = {"teacher": str(root / "teacher"), "student": str(root / "student"), "train_file": paths["train"],
           "validation_file": paths["validation"], "max_steps": 2, "lr": 1e-2, "kd_weight": 0.5, "alpha": 0.5,
           "lam": 0.2, "max_length": 48, "eval_max_new_tokens": 4, "eval_batch_size": 4, "plots": False,
           "progress": False, "seed": 0, "device": "cpu", "teacher_cache": str(root / "cache")}
    (root / "cfg.json").write_text(json.dumps(cfg))
    # Small shards (a few examples each), so that which shards a rank opens says which samples it reads.
    assert distill_cli.main(["cache-teacher", "--config", str(root / "cfg.json"), "--shard-mb", "0.001"]) == 0
    manifest = json.load(open(root / "cache" / INDEX_FILE))
    train_shards = [s for s in manifest["shards"] if s["split"] == "train"]
    assert len(train_shards) >= 8
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert distill_cli.main(["--config", str(root / "cfg.json"), "--output-dir", str(root / "single"),
                                 "--micro-batch-size", "2", "--grad-accum-steps", "2"]) == 0
    finally:
        torch.set_num_threads(n)
    (root / "record_reads.py").write_text(_RECORD_READS)
    (root / "reads").mkdir()
    out = _torchrun(root, "ddp", script=root / "record_reads.py", env={"AMID_TEST_READS": str(root / "reads")})
    assert json.load(open(out / "summary.json"))["world_size"] == 2
    wa, wb = load_file(str(root / "single" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    la, lb = train_records(str(root / "single")), train_records(str(out))
    assert [r["loss"] for r in lb] == pytest.approx([r["loss"] for r in la], rel=1e-4)
    # Each rank read exactly its own samples: its micro-batches of the 2 steps (train) and its round-robin
    # share of the validation split (evaluation before and after training).
    reads = [json.load(open(root / "reads" / f"rank{r}.json")) for r in (0, 1)]
    global_batches = set()
    sampler = StepSampler(16, 2, 2, 1, 0, seed=0)
    for _ in range(2):
        global_batches |= {i for mb in sampler.next_step() for i in mb}
    n_val = json.load(open(root / "cache" / INDEX_FILE))["identity"]["data"]["splits"]["validation"]["num_examples"]
    mine = []
    for r in (0, 1):
        sampler = StepSampler(16, 2, 1, 2, r, seed=0)
        want = [i for _ in range(2) for mb in sampler.next_step() for i in mb]
        got = [i for s, i in reads[r]["keys"] if s == "train"]
        assert got == want, (r, got, want)
        assert {i for s, i in reads[r]["keys"] if s == "validation"} == set(range(r, n_val, 2))
        mine.append(set(got))
        # ... and opened only the shards that hold them.
        holding = {s["file"] for s in manifest["shards"]
                   if any(s["split"] == sp and s["first_example"] <= i < s["first_example"] + s["num_examples"]
                          for sp, i in reads[r]["keys"])}
        assert set(reads[r]["opened"]) == holding and len(reads[r]["opened"]) == len(holding)
    assert not mine[0] & mine[1] and mine[0] | mine[1] == global_batches and len(global_batches) == 8
    opened_train = [{f for f in reads[r]["opened"] if f.startswith("train")} for r in (0, 1)]
    assert opened_train[0] != opened_train[1] and all(len(o) < len(train_shards) for o in opened_train)


def test_sweep_settings_train_from_teacher_caches(tmp_path, world):
    """amid-distill sweep: a setting with ``teacher_cache`` trains from the cache (no teacher model) beside online
    settings of the same start and seeds; the 'hidden' runs equal the online runs; a bad cache fails before any run."""
    from amid.distill import sweep as S

    tok, teacher = world
    base = tiny_config(tmp_path, kd_weight=1.0, max_steps=2, eval_max_examples=2, eval_max_new_tokens=4,
                       cache_teacher=False, output_dir=str(tmp_path / "sweep"))
    hidden, topk = str(tmp_path / "hidden"), str(tmp_path / "topk")
    cache_teacher(base, hidden, teacher=teacher, tokenizer=tok, progress=False)
    cache_teacher(base, topk, mode="topk", k=8, teacher=teacher, tokenizer=tok, progress=False)
    grid = {"settings": [{"name": "online", "preset": "amid_a0.5"},
                         {"name": "hidden", "preset": "amid_a0.5", "teacher_cache": hidden},
                         {"name": "topk8", "preset": "amid_a0.5", "teacher_cache": topk}],
            "seeds": [0], "sft_steps": 1}
    # A missing cache, or one that does not fit its setting, is refused before anything runs.
    for bad, match in (({"teacher_cache": str(tmp_path / "nope")}, "does not exist"),
                       ({"teacher_cache": topk, "temperature": 2.0}, "needs temperature 1")):
        g = dict(grid, settings=grid["settings"] + [dict({"name": "bad", "preset": "amid_a0.5"}, **bad)])
        with pytest.raises(ConfigError, match=f"setting 'bad': .*{match}"):
            S.run_sweep(base, g, teacher=teacher, tokenizer=tok)
        assert not os.path.exists(base.output_dir)
    res = S.run_sweep(base, grid, teacher=teacher, tokenizer=tok)
    assert [(r["setting"], r["n"]) for r in res["rows"]] == [("online", 1), ("hidden", 1), ("topk8", 1)]
    runs = {name: os.path.join(base.output_dir, "runs", name, "seed0") for name in ("online", "hidden", "topk8")}
    for name, cache in (("online", None), ("hidden", hidden), ("topk8", topk)):
        cfg = json.load(open(os.path.join(runs[name], "distill_config.json")))
        assert cfg["teacher_cache"] == cache and cfg["student"] == os.path.join(base.output_dir, "sft")
        assert (cfg["alpha"], cfg["lam"]) == (0.5, 0.1)
    on, hid, tk = (train_records(runs[n]) for n in ("online", "hidden", "topk8"))
    assert len(on) == len(hid) == len(tk) == 2
    assert [r["loss"] for r in hid] == pytest.approx([r["loss"] for r in on], rel=1e-5)
    assert "topk_tail_teacher" in tk[0] and "topk_tail_teacher" not in on[0]
    assert [r["loss"] for r in tk] != pytest.approx([r["loss"] for r in on], rel=1e-5)  # k = 8: approximate
    fin = {r["setting"]: r for r in res["rows"]}
    assert fin["hidden"]["val_kl_mean"] == pytest.approx(fin["online"]["val_kl_mean"], rel=1e-4)


def test_trainer_uses_the_fused_adamw_with_the_same_update(tmp_path, world, monkeypatch):
    """The step-time work of issue 10: the optimizer is torch's fused AdamW on CPU (one pass per parameter;
    the default loop was ~12x slower on the demo student); two steps equal the default implementation's."""
    from amid.distill import trainer as T

    tok, teacher = world
    cfg = tiny_config(tmp_path, kd_weight=0.5, max_steps=2, eval_teacher=False, weight_decay=0.1, warmup_steps=0)
    runs = {}
    for name, fused in (("fused", True), ("default", False)):
        monkeypatch.setattr(T, "_fused_adamw_ok", (lambda ps: True) if fused else (lambda ps: False))
        d = Distiller(cfg.replace(output_dir=str(tmp_path / name)), teacher=teacher, tokenizer=tok,
                      student=make_model(len(tok), layers=1, seed=5))
        assert d.optimizer.defaults["fused"] is (True if fused else None)
        d.eval_sets = {}
        for _ in range(2):
            d.train_step()
        runs[name] = {k: v.detach().clone() for k, v in d.student.state_dict().items()}
    moved = 0.0
    init = make_model(len(tok), layers=1, seed=5).state_dict()
    for k, v in runs["default"].items():
        torch.testing.assert_close(runs["fused"][k], v, rtol=1e-5, atol=1e-6)
        moved = max(moved, float((v - init[k]).abs().max()))
    assert moved > 1e-3
    monkeypatch.undo()
    assert T._fused_adamw_ok([torch.zeros(2, requires_grad=True)])
    assert not T._fused_adamw_ok([torch.zeros(2, dtype=torch.int64)]) and not T._fused_adamw_ok([])
