"""amid-distill's SFT warm start, the generalized-JSD objective and ``amid-distill sweep`` (tiny models, seconds)."""
import json
import os
import statistics

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("rouge_score")

import amid  # noqa: E402
from amid.distill import ConfigError  # noqa: E402
from amid.distill import cli as distill_cli  # noqa: E402
from amid.distill import sweep as S  # noqa: E402
from amid.distill.data import IGNORE_INDEX, collate_train  # noqa: E402
from amid.distill.trainer import Distiller  # noqa: E402

from test_distill import make_teacher, make_tokenizer, saved_teacher, tiny_config, train_records  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(x) for x in f]


# ------------------------------------------------------------------------------------------------
# SFT warm start inside one run.

def test_sft_steps_phase_logging_and_resume(tmp_path):
    tok = make_tokenizer()
    teacher = make_teacher(tok)
    kw = dict(sft_steps=2, max_steps=3, kd_weight=1.0, alpha=-3.0, lam=0.1, save_every=1, eval_teacher=False,
              lam_schedule="linear", lam_start=0.2, lam_end=0.8)
    full_cfg = tiny_config(tmp_path, output_dir=str(tmp_path / "full"), **kw)
    full = Distiller(full_cfg, teacher=teacher, tokenizer=tok)
    summary = full.train()
    assert summary["steps"] == 5
    recs = train_records(full_cfg.output_dir)
    assert [(r["step"], r["phase"]) for r in recs] == [(1, "sft"), (2, "sft"), (3, "distill"), (4, "distill"),
                                                       (5, "distill")]
    # SFT steps are cross-entropy only (no KD term); distillation steps with kd_weight 1 have no CE term.
    assert all(r["kd"] is None and r["ce"] == pytest.approx(r["loss"]) for r in recs[:2])
    assert all(r["kd"] == pytest.approx(r["loss"]) and r["ce"] is None for r in recs[2:])
    # λ schedule runs over the distillation steps only: 0.2, 0.4, 0.6 at distillation steps 1..3.
    assert [r["lam"] for r in recs[2:]] == pytest.approx([0.2, 0.4, 0.6])
    # Each phase has its own LR schedule (cosine from the peak, no warm-up): both start at lr.
    assert recs[0]["lr"] == pytest.approx(full_cfg.lr) and recs[2]["lr"] == pytest.approx(full_cfg.lr)
    assert [r["model"] for r in summary["rows"]] == ["student (before)", "student (after SFT)", "student (after)"]
    sft_evals = [r for r in _records(full_cfg.output_dir) if r["type"] == "eval" and r["phase"] == "sft"]
    assert {(r["split"], r["step"]) for r in sft_evals} == {("validation", 2), ("test", 2)}

    # Killed inside the SFT phase and right at its end: the resumed runs equal the uninterrupted one.
    for stop in (1, 2):
        cfg = tiny_config(tmp_path, output_dir=str(tmp_path / f"split{stop}"), **kw)
        first = Distiller(cfg, teacher=teacher, tokenizer=tok)
        assert first.train(stop_after=stop) is None
        del first
        second = Distiller(cfg.replace(resume=True), teacher=teacher, tokenizer=tok)
        assert second.step == stop and second.phase == ("sft" if stop < 2 else "distill")
        second.train()
        rb = train_records(cfg.output_dir)
        assert [(r["step"], r["phase"]) for r in rb] == [(r["step"], r["phase"]) for r in recs]
        assert [r["loss"] for r in rb] == pytest.approx([r["loss"] for r in recs], rel=1e-5)
        sa, sb = full.student.state_dict(), second.student.state_dict()
        for n in sa:
            torch.testing.assert_close(sb[n], sa[n], rtol=1e-5, atol=1e-6)


def test_sft_steps_with_the_fused_loss_log_their_cross_entropy(tmp_path):
    tok = make_tokenizer()
    cfg = tiny_config(tmp_path, sft_steps=1, max_steps=1, fused_linear=True, kd_weight=0.5, eval_teacher=False)
    d = Distiller(cfg, teacher=make_teacher(tok), tokenizer=tok)
    d.eval_sets = {}
    d.train()
    sft, dist = train_records(cfg.output_dir)
    assert sft["phase"] == "sft" and sft["ce"] == pytest.approx(sft["loss"]) and sft["kd"] is None
    assert dist["phase"] == "distill" and dist["ce"] is None and dist["kd"] is None  # fused: one total value


def test_gjsd_objective_equals_generalized_jsd(tmp_path):
    tok = make_tokenizer()
    teacher = make_teacher(tok)
    cfg = tiny_config(tmp_path, gjsd_beta=0.3, kd_weight=1.0, eval_teacher=False, alpha=2.0, lam=0.7, order="rq")
    d = Distiller(cfg, teacher=teacher, tokenizer=tok)
    ex = d.train_set[:4]
    b = collate_train([{"input_ids": e.input_ids, "labels": e.labels} for e in ex], d.pad_id)
    row_mask = b["labels"][:, 1:] != IGNORE_INDEX
    labels = b["labels"][:, 1:][row_mask]
    n = row_mask.sum().float()
    th = d._teacher_hidden(b, None)
    out = d.engine(task="loss", input_ids=b["input_ids"], attention_mask=b["attention_mask"], row_mask=row_mask,
                   labels=labels, teacher_hidden=th, teacher_head=d._teacher_head(), normalizer=n, lam=0.7,
                   kd_weight=1.0, ce_weight=0.0)
    with torch.no_grad():
        s = d.engine(task="logits", input_ids=b["input_ids"], attention_mask=b["attention_mask"], row_mask=row_mask)
        t = torch.nn.functional.linear(th, d._teacher_head()[0])
        ref = amid.generalized_jsd(s.double(), t.double(), beta=0.3, reduction="sum") / n.double()
        fkl = amid.forward_kl(s.double(), t.double(), reduction="sum") / n.double()
    torch.testing.assert_close(out["kd"].double(), ref, rtol=1e-4, atol=1e-6)
    assert abs(float(ref) - float(fkl)) > 1e-3  # a different objective than the AMiD fields would give
    with pytest.raises(ConfigError, match="gjsd_beta.*fused"):
        tiny_config(tmp_path, gjsd_beta=0.5, fused_linear=True).validate(teacher_given=True)
    with pytest.raises(ConfigError, match="gjsd_beta"):
        tiny_config(tmp_path, gjsd_beta=1.5).validate(teacher_given=True)


# ------------------------------------------------------------------------------------------------
# The sweep.

GRID = {"settings": ["forward_kl", {"name": "amid_a-3", "preset": "amid_a-3", "lam": 0.2}], "seeds": [0, 1],
        "sft_steps": 2}


def _base(tmp_path, **kw):
    kw = dict(dict(max_steps=2, kd_weight=1.0, output_dir=str(tmp_path / "sweep")), **kw)
    return tiny_config(tmp_path, **kw)


def test_sweep_table_is_mean_and_std_of_the_runs(tmp_path, capsys):
    tok = make_tokenizer()
    teacher = make_teacher(tok)
    base = _base(tmp_path)
    res = S.run_sweep(base, GRID, teacher=teacher, tokenizer=tok)
    out = base.output_dir
    log = capsys.readouterr().out
    assert "[sweep 1/5] sft: done" in log and "[sweep 5/5] amid_a-3 seed 1: done" in log
    for name in ("results.md", "results.csv", "results.json", "results.png", "sweep.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert [r["setting"] for r in res["rows"]] == ["forward_kl", "amid_a-3"]
    sft_summary = json.load(open(os.path.join(out, "sft", "summary.json")))
    sft_final = [r for r in sft_summary["rows"] if r["model"] == "student (after)"][0]
    assert res["reference"]["SFT start"] == sft_final
    assert res["reference"]["teacher"] == [r for r in sft_summary["rows"] if r["model"] == "teacher"][0]
    for row in res["rows"]:
        assert row["n"] == 2 and row["seeds"] == [0, 1]
        finals = []
        for seed in (0, 1):
            run = os.path.join(out, "runs", row["setting"], f"seed{seed}")
            cfg = json.load(open(os.path.join(run, "distill_config.json")))
            # Every run starts from the shared SFT student and differs only in loss and seed.
            assert cfg["student"] == os.path.join(out, "sft") and cfg["seed"] == seed and cfg["sft_steps"] == 0
            # The SFT run's final evaluation is the start of every run: not repeated per run.
            assert cfg["eval_student_before"] is False and cfg["eval_teacher"] is False
            s = json.load(open(os.path.join(run, "summary.json")))
            assert [r["model"] for r in s["rows"]] == ["student (after)"]
            assert not [d for d in os.listdir(run) if d.startswith("checkpoint-")]  # dropped once finished
            finals.append([r for r in s["rows"] if r["model"] == "student (after)"][0])
        for key, _, _ in S.METRICS:
            vals = [f[key] for f in finals]
            assert row[key + "_mean"] == pytest.approx(statistics.mean(vals), rel=1e-12, abs=1e-12)
            assert row[key + "_std"] == pytest.approx(statistics.stdev(vals), rel=1e-9, abs=1e-12)
    # The settings really differ: the preset's fields reached the runs.
    cfg = json.load(open(os.path.join(out, "runs", "amid_a-3", "seed0", "distill_config.json")))
    assert (cfg["alpha"], cfg["lam"], cfg["order"]) == (-3.0, 0.2, "pr")
    cfg = json.load(open(os.path.join(out, "runs", "forward_kl", "seed1", "distill_config.json")))
    assert (cfg["alpha"], cfg["lam"], cfg["order"]) == (1.0, 0.0, "pr")
    # The table, CSV and JSON carry the same numbers.
    md = open(os.path.join(out, "results.md")).read()
    r0 = res["rows"][0]
    assert f"| forward_kl | 2 | {r0['rouge_l_mean']:.1f} ± {r0['rouge_l_std']:.1f}" in md
    assert "*teacher*" in md and "*SFT start*" in md
    import csv
    rows = list(csv.DictReader(open(os.path.join(out, "results.csv"))))
    assert float(rows[1]["val_kl_mean"]) == res["rows"][1]["val_kl_mean"]
    assert json.load(open(os.path.join(out, "results.json")))["rows"][1]["val_ce_std"] == res["rows"][1]["val_ce_std"]


def test_killed_sweep_resumes_without_redoing_finished_runs(tmp_path, capsys):
    tok = make_tokenizer()
    teacher = make_teacher(tok)
    base = _base(tmp_path, save_every=1)
    # "Killed" after the SFT run and the first run; then the second run is killed after its first step.
    assert S.run_sweep(base, GRID, teacher=teacher, tokenizer=tok, stop_after_runs=2) == {}
    out = base.output_dir
    done = os.path.join(out, "runs", "forward_kl", "seed0", "summary.json")
    assert os.path.isfile(done) and not os.path.exists(os.path.join(out, "runs", "forward_kl", "seed1"))
    mtime = os.path.getmtime(done)
    part = S.run_sweep(base, GRID, teacher=teacher, tokenizer=tok, aggregate_only=True)
    assert [(r["setting"], r["n"]) for r in part["rows"]] == [("forward_kl", 1), ("amid_a-3", 0)]
    assert part["rows"][0]["rouge_l_std"] is None and part["rows"][1]["rouge_l_mean"] is None
    plan = S.plan_sweep(base, GRID, teacher_given=True)
    name, seed, cfg = plan.runs[1]
    assert Distiller(cfg, teacher=teacher, tokenizer=tok).train(stop_after=1) is None
    assert S.run_state(cfg.output_dir) == "resume"
    capsys.readouterr()
    res = S.run_sweep(base, GRID, teacher=teacher, tokenizer=tok)
    log = capsys.readouterr().out
    assert "[sweep 1/5] sft: finished before, skipped" in log
    assert "[sweep 2/5] forward_kl seed 0: finished before, skipped" in log
    assert "[sweep 3/5] forward_kl seed 1: resuming from its last checkpoint" in log
    assert "resumed from" in log and "at step 1/2" in log
    assert os.path.getmtime(done) == mtime
    assert [r["n"] for r in res["rows"]] == [2, 2]
    assert [r["step"] for r in train_records(cfg.output_dir)] == [1, 2]
    # A third call only aggregates.
    capsys.readouterr()
    S.run_sweep(base, GRID, teacher=teacher, tokenizer=tok)
    assert capsys.readouterr().out.count("finished before, skipped") == 5


def test_bad_grids_fail_before_anything_runs(tmp_path, capsys):
    base = _base(tmp_path)
    out = base.output_dir
    bad = [
        ({"settings": ["forward_kl", "fwd_kl"]}, "unknown preset 'fwd_kl'"),
        ({"settings": [{"name": "a", "alpah": 1.0}]}, "unknown config field 'alpah' (did you mean 'alpha'?)"),
        ({"settings": [{"name": "a", "seed": 3}]}, "field 'seed' is set by the sweep"),
        ({"settings": [{"alpha": 1.0}]}, "expected a 'name'"),
        ({"settings": ["forward_kl", "forward_kl"]}, "used twice"),
        ({"settings": ["forward_kl"], "seeds": [0, 0]}, "grid 'seeds'"),
        ({"settings": ["forward_kl"], "seed": [0]}, "unknown key(s) ['seed']"),
        ({"settings": [{"name": "a", "alpha": "x"}]}, "setting 'a': amid-distill: config field 'alpha'"),
        ({"settings": []}, "grid 'settings'"),
    ]
    for grid, msg in bad:
        with pytest.raises(ConfigError) as e:
            S.run_sweep(base, grid, teacher=object(), tokenizer=object())
        assert msg in str(e.value) and str(e.value).startswith("amid-distill sweep:"), str(e.value)
        assert not os.path.exists(out)
    # An output directory that holds another sweep, or something else.
    spec = S.plan_sweep(base.replace(lr=0.5), GRID, teacher_given=True).spec()
    spec2 = S.plan_sweep(base, dict(GRID, settings=[{"name": "amid_a-3", "alpha": -1.0}]), teacher_given=True).spec()
    os.makedirs(out)
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump(spec, f)
    with pytest.raises(ConfigError, match=r"holds another sweep \(its base config differs in \['lr'\]\)"):
        S.plan_sweep(base, GRID, teacher_given=True)
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump(spec2, f)
    with pytest.raises(ConfigError, match="setting 'amid_a-3' has other fields there"):
        S.plan_sweep(base, GRID, teacher_given=True)
    S.plan_sweep(base, dict(GRID, settings=["forward_kl"]), teacher_given=True)  # another setting name: the sweep grows
    with open(os.path.join(out, "sweep.json"), "w") as f:
        f.write("{")
    with pytest.raises(ConfigError, match="unreadable"):
        S.plan_sweep(base, GRID, teacher_given=True)
    os.remove(os.path.join(out, "sweep.json"))
    open(os.path.join(out, "notes.txt"), "w").close()
    with pytest.raises(ConfigError, match="holds no sweep.json"):
        S.plan_sweep(base, GRID, teacher_given=True)
    # The CLI: one line, exit code 2.
    grid = tmp_path / "grid.yaml"
    grid.write_text("settings: [forward_kl, nope]\nseeds: [0]\n")
    assert distill_cli.main(["sweep", "--grid", str(grid), "--train-file", base.train_file, "--teacher",
                             str(tmp_path), "--output-dir", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("amid-distill sweep: grid 'settings'[1]: unknown preset 'nope'") and "\n" not in err


def test_presets_are_the_spec_special_cases():
    """Each preset's fields give the named loss (amid-math.md §6) on random logits."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 11, generator=g, dtype=torch.float64)
    t = torch.randn(5, 11, generator=g, dtype=torch.float64)
    expect = {
        "forward_kl": amid.forward_kl(s, t), "reverse_kl": amid.reverse_kl(s, t),
        "skew_kl": amid.skew_forward_kl(s, t, skew=0.1), "skew_rkl": amid.skew_reverse_kl(s, t, skew=0.1),
        "abkd": amid.ab_divergence(s, t, ab_alpha=0.2, ab_beta=0.7), "taid": amid.taid_loss(s, t, tau=0.4),
    }
    for name, ref in expect.items():
        f = dict(S._LOSS_DEFAULTS, **S.PRESETS[name])
        lam = f["lam_start"] if f["lam_schedule"] == "taid" else f["lam"]
        got = amid.amid_loss(s, t, alpha=f["alpha"], lam=lam, divergence=f["divergence"], order=f["order"],
                             ab_alpha=f["ab_alpha"], ab_beta=f["ab_beta"], detach_assistant=f["detach_assistant"])
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12, msg=name)
    assert S.PRESETS["gjsd"] == {"gjsd_beta": 0.5}
    assert S.PRESETS["amid_a-3"] == {"alpha": -3.0, "lam": 0.1, "order": "pr"}


def test_parallel_jobs_run_as_processes(tmp_path, saved_teacher, capsys):
    """``jobs=2``: the SFT run, then two runs at a time as ``amid-distill`` processes (teacher from disk)."""
    base = _base(tmp_path, teacher=str(saved_teacher), max_steps=1, eval_max_examples=2)
    grid = {"settings": ["forward_kl"], "seeds": [0, 1], "sft_steps": 1}
    res = S.run_sweep(base, grid, jobs=2)
    log = capsys.readouterr().out
    assert "[sweep 1/3] sft: done" in log and "[sweep 2/3] forward_kl seed 0: started" in log
    assert "[sweep 3/3] forward_kl seed 1: started" in log
    assert res["rows"][0]["n"] == 2 and res["rows"][0]["seeds"] == [0, 1]
    for seed in (0, 1):
        run = os.path.join(base.output_dir, "runs", "forward_kl", f"seed{seed}")
        assert json.load(open(os.path.join(run, "distill_config.json")))["student"] == os.path.join(base.output_dir,
                                                                                                   "sft")
    with pytest.raises(ConfigError, match="jobs"):
        S.run_sweep(base, grid, jobs=0)
