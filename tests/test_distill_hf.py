"""amid-distill as Hugging Face / TRL users expect it: CLI spellings and aliases, output layout, teacher
precision and load options, transformers' LR schedules, the bounded teacher cache, TensorBoard."""
import json
import math
import os

import pytest
import torch

pytest.importorskip("transformers")

from test_distill import (_one_thread, make_model, make_teacher, make_tokenizer, one_line_error,  # noqa: E402,F401
                         saved_teacher, tiny_config, train_records)
from transformers import AutoModelForCausalLM  # noqa: E402

from amid.distill import ConfigError, DistillConfig  # noqa: E402
from amid.distill import cli as distill_cli  # noqa: E402
from amid.distill.trainer import Distiller  # noqa: E402



# ------------------------------------------------------------------------------------------------
# CLI: both spellings, HF/TRL aliases, choices in --help, one-line errors with "did you mean".

def test_cli_spellings_aliases_and_config_file_aliases(tmp_path):
    base = ["--teacher", "/x", "--train-file", "t.jsonl"]
    for flags in (["--kd-weight", "0.25", "--micro-batch-size", "3"], ["--kd_weight", "0.25", "--micro_batch_size", "3"],
                  ["--kd_weight", "0.25", "--per_device_train_batch_size", "3"],
                  ["--kd-weight", "0.25", "--per-device-train-batch-size", "3"]):
        cfg = distill_cli.resolve_config(base + flags)
        assert (cfg.kd_weight, cfg.micro_batch_size) == (0.25, 3), flags
    cfg = distill_cli.resolve_config(base + ["--learning_rate", "2e-3", "--gradient_accumulation_steps", "4",
                                             "--num_train_epochs", "3", "--logging_steps", "5", "--save_steps", "7",
                                             "--teacher_model_name_or_path", "/t", "--model_name_or_path", "/s",
                                             "--no-scale_by_t2", "--teacher-load-kwargs", '{"low_cpu_mem_usage": true}'])
    assert (cfg.lr, cfg.grad_accum_steps, cfg.num_epochs, cfg.log_every, cfg.save_every) == (2e-3, 4, 3.0, 5, 7)
    assert (cfg.teacher, cfg.student, cfg.scale_by_t2) == ("/t", "/s", False)
    assert cfg.teacher_load_kwargs == {"low_cpu_mem_usage": True}
    # --resume: bare = latest, a path, or --no-resume.
    assert distill_cli.resolve_config(base + ["--resume"]).resume == "latest"
    assert distill_cli.resolve_config(base + ["--resume", "/ckpt"]).resume == "/ckpt"
    assert distill_cli.resolve_config(base + ["--resume", "--no-resume"]).resume is False
    # Config files take the HF names too, and a name given twice is an error.
    f = tmp_path / "run.yaml"
    f.write_text("teacher: /x\ntrain_file: t.jsonl\nlearning_rate: 0.01\nper_device_train_batch_size: 2\n"
                 "resume_from_checkpoint: latest\n")
    cfg = distill_cli.resolve_config(["--config", str(f)])
    assert (cfg.lr, cfg.micro_batch_size, cfg.resume) == (0.01, 2, "latest")
    with pytest.raises(ConfigError, match="config field 'lr' is given twice"):
        DistillConfig.from_dict({"lr": 1.0, "learning_rate": 2.0})


def test_cli_help_lists_choices_and_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        distill_cli.main(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for choices in ("{kl,ab}", "{pr,qr,rp,rq,jsd}", "{constant,linear,taid}", "{auto,none,ddp,fsdp}",
                    "{linear,cosine,cosine_with_min_lr,constant,constant_with_warmup}", "{constant,increasing,decreasing}",
                    "{float32,fp32,bfloat16,bf16,float16,fp16}", "{auto,true,false}", "one of auto, cpu, cuda, cuda:N",
                    "--learning_rate"):
        assert choices in out, choices
    for argv, expected in (
            (["--kd-wieght", "0.5"], "unknown flag '--kd-wieght' (did you mean '--kd-weight'?)"),
            (["--learning-rat", "0.5"], "unknown flag '--learning-rat' (did you mean '--learning-rate'?)"),
            (["--kd-weight", "half"], "argument --kd-weight/--kd_weight: invalid float value: 'half'"),
            (["--divergence", "js"], "argument --divergence: invalid choice: 'js'"),
            (["--teacher-load-kwargs", "[1]"], "expected a JSON object, but got '[1]'")):
        with pytest.raises(SystemExit) as e:
            distill_cli.main(argv)
        assert e.value.code == 2
        assert expected in one_line_error(capsys), argv


def test_bad_input_is_one_line_exit_2_and_overwrites_nothing(tmp_path, saved_teacher, capsys):
    cfg = tiny_config(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text("keep\n")
    base = ["--teacher", str(saved_teacher), "--train-file", cfg.train_file, "--output-dir", str(out), "--no-progress"]
    cases = [
        (["--validation-file", str(tmp_path / "missing.jsonl")], "config field 'validation_file': the file"),
        (["--config", str(tmp_path / "missing.yaml")], "the config file"),
        (["--resume", str(tmp_path)], f"config field 'resume': '{tmp_path}' is not a complete checkpoint"),
        (["--resume", str(tmp_path / "nope")], "config field 'resume': the checkpoint directory"),
        (["--teacher-dtype", "int8"], "invalid choice: 'int8'"),
        (["--report-to", "mlflow"], "config field 'report_to'"),
        (["--lr-scheduler-type", "linear", "--min-lr-ratio", "0.1"], "config field 'min_lr_ratio'"),
        (["--teacher-load-kwargs", '{"dtype": "float16"}'], "config field 'teacher_load_kwargs'"),
        (["--shard-teacher"], "config field 'shard_teacher': sharding the teacher needs strategy 'fsdp'"),
    ]
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        cases.append((["--report-to", "tensorboard,wandb"], "'wandb' needs the wandb package"))
    for extra, expected in cases:
        with pytest.raises(SystemExit) if "invalid choice" in expected else _NoRaise() as e:
            rc = distill_cli.main(base + extra)
        code = e.value.code if isinstance(e, pytest.ExceptionInfo) else rc
        assert code == 2, extra
        assert expected in one_line_error(capsys), extra
    assert sorted(os.listdir(out)) == ["metrics.jsonl"] and (out / "metrics.jsonl").read_text() == "keep\n"


class _NoRaise:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------------------------------
# Output layout: from_pretrained(output_dir), model card, checkpoint-N with JSON trainer state,
# --resume latest / PATH; LR schedule from transformers; TensorBoard events.

def test_output_layout_resume_path_lr_schedule_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tok = make_tokenizer()
    teacher = make_teacher(tok)
    cfg = tiny_config(tmp_path, max_steps=6, save_every=2, save_total_limit=3, eval_teacher=False, kd_weight=0.5,
                      lr=1e-3, lr_scheduler_type="linear", warmup_steps=2, report_to="tensorboard")
    d = Distiller(cfg, teacher=teacher, tokenizer=tok, student=make_model(len(tok), layers=1, seed=5))
    d.train()
    out = cfg.output_dir
    # The final student: plain Hugging Face loading from the output directory.
    model = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(model.lm_head.weight, d.student.lm_head.weight)
    assert json.load(open(os.path.join(out, "distill_config.json")))["kd_weight"] == 0.5
    card = open(os.path.join(out, "README.md")).read()
    assert card.startswith("---\nlibrary_name: transformers\n") and "| objective | 0.5 * AMiD + 0.5 * CE" in card
    assert "student (after)" in card and "test ROUGE-L" in card
    # Checkpoints checkpoint-N with a JSON trainer state (HF's global_step / log_history, no pickle).
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-4",
                                                                                 "checkpoint-6"]
    state = json.load(open(os.path.join(out, "checkpoint-4", "trainer_state.json")))
    assert state["global_step"] == 4 and [r["step"] for r in state["log_history"]] == [1, 2, 3, 4]
    assert not any(n.endswith((".pt", ".bin", ".pkl")) for n in os.listdir(os.path.join(out, "checkpoint-4")))
    AutoModelForCausalLM.from_pretrained(os.path.join(out, "checkpoint-4"))
    # HF's linear schedule with 2 warm-up steps: 0, 1/2, 1, then linear decay to 0 at step 6.
    lrs = [r["lr"] for r in train_records(out)]
    assert lrs == pytest.approx([1e-3 * f for f in (0, 0.5, 1, 0.75, 0.5, 0.25)])
    # TensorBoard: the event files hold the logged curves.
    acc = EventAccumulator(os.path.join(out, "runs"))
    acc.Reload()
    tb_loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert tb_loss == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in train_records(out)]
    assert "eval/test/student/rouge_l" in acc.Tags()["scalars"]
    # --resume with an explicit checkpoint path (not the newest) and with 'latest'.
    again = Distiller(cfg.replace(resume=os.path.join(out, "checkpoint-2"), report_to="none"), teacher=teacher,
                      tokenizer=tok)
    assert again.step == 2 and again.scheduler.get_last_lr()[0] == pytest.approx(1e-3)
    latest = Distiller(cfg.replace(resume="latest", report_to="none"), teacher=teacher, tokenizer=tok)
    assert latest.step == 6


def _wandb_records(run_file):
    """The records of an offline W&B run file (``run-*.wandb``): a LevelDB-style log of protobuf
    ``Record`` messages after a 7-byte header, in 32 KiB blocks of chunks (crc32, length, type)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B", data[:8]
    block, pos, whole, part = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is zero padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 1:  # full
            whole.append(chunk)
        elif kind == 2:  # first
            part = chunk
        elif kind == 3:  # middle
            part += chunk
        else:  # last
            whole.append(part + chunk)
    out = []
    for d in whole:
        rec = pb.Record()
        rec.ParseFromString(d)
        out.append(rec)
    return out


def test_report_to_wandb_offline_logs_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import glob

    import wandb

    for k in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(k, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    tok = make_tokenizer()
    cfg = tiny_config(tmp_path, max_steps=3, eval_teacher=False, kd_weight=0.5, report_to="wandb", test_file=None)
    try:
        Distiller(cfg, teacher=make_teacher(tok), tokenizer=tok, student=make_model(len(tok), layers=1, seed=5)).train()
    finally:
        wandb.teardown()
    runs = glob.glob(os.path.join(cfg.output_dir, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(runs) == 1, runs
    records = _wandb_records(runs[0])
    history = [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    train = [h for h in history if "train/loss" in h]
    expected = train_records(cfg.output_dir)
    assert [h["_step"] for h in train] == [r["step"] for r in expected] == [1, 2, 3]
    assert [h["train/loss"] for h in train] == pytest.approx([r["loss"] for r in expected], rel=1e-6)
    assert [h["train/lr"] for h in train] == pytest.approx([r["lr"] for r in expected], rel=1e-6)
    val = [h for h in history if "eval/validation/student/ce" in h]
    evals = [r for r in map(json.loads, open(os.path.join(cfg.output_dir, "metrics.jsonl")))
             if r["type"] == "eval" and r["split"] == "validation" and r["model"] == "student"]
    assert [h["eval/validation/student/ce"] for h in val] == pytest.approx([r["ce"] for r in evals], rel=1e-6)
    # The run's config went along.
    configs = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "run"
               for i in r.run.config.update}
    kd = configs.get("kd_weight")
    assert (kd.get("value") if isinstance(kd, dict) else kd) == 0.5, sorted(configs)[:10]


def _tree(root):
    """Every file below ``root`` with its bytes' hash."""
    import hashlib

    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            full = os.path.join(d, n)
            out[os.path.relpath(full, root)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
    return out


def test_new_run_into_another_runs_output_dir_is_refused_unless_resumed_or_overwritten(tmp_path, saved_teacher,
                                                                                        capsys):
    cfg = tiny_config(tmp_path, teacher=str(saved_teacher), max_steps=2, save_every=1, eval_teacher=False,
                      validation_file=None, test_file=None)
    Distiller(cfg).train()
    out = cfg.output_dir
    before = _tree(out)
    assert {"checkpoint-1/manifest.json", "checkpoint-2/manifest.json", "model.safetensors"} <= set(before)
    base = ["--teacher", str(saved_teacher), "--train-file", cfg.train_file, "--output-dir", out,
            "--student-num-layers", "1", "--max-steps", "2", "--validation-file", "none", "--test-file", "none",
            "--no-eval-teacher", "--no-progress", "--no-plots", "--micro-batch-size", "4", "--lr", "3e-3",
            "--max-length", "48", "--eval-max-new-tokens", "8"]
    capsys.readouterr()
    assert distill_cli.main(base) == 2
    err = one_line_error(capsys)
    assert (f"config field 'output_dir': '{out}' already holds another run (checkpoint-1/, checkpoint-2/, "
            "model.safetensors); expected a new or empty directory: pass --resume to continue that run, "
            "--overwrite-output-dir to replace it") in err, err
    assert _tree(out) == before  # nothing written, nothing removed
    # The Python API refuses it the same way.
    with pytest.raises(ConfigError, match="already holds another run"):
        Distiller(cfg)
    # A final model alone (no checkpoints) counts as a run too.
    only_model = tmp_path / "only_model"
    only_model.mkdir()
    (only_model / "model.safetensors").write_bytes(open(os.path.join(out, "model.safetensors"), "rb").read())
    assert distill_cli.main(base[:5] + [str(only_model)] + base[6:]) == 2
    assert f"'{only_model}' already holds another run (model.safetensors)" in one_line_error(capsys)
    # --resume continues the run (here: already finished, so nothing more is trained).
    assert distill_cli.main(base + ["--resume"]) == 0
    assert len(train_records(out)) == 2
    # --overwrite-output-dir replaces it: the old checkpoints go, the new run's are written.
    capsys.readouterr()
    assert distill_cli.main(base + ["--overwrite-output-dir", "--save-every", "0"]) == 0
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-2"]
    assert [r["step"] for r in train_records(out)] == [1, 2]
    assert _tree(out)["checkpoint-2/manifest.json"] != before["checkpoint-2/manifest.json"]


# ------------------------------------------------------------------------------------------------
# Teacher precision, load options, the bounded teacher cache.

def test_teacher_dtype_and_load_options(tmp_path, saved_teacher):
    tok = make_tokenizer()
    sdir = tmp_path / "student"
    make_model(len(tok), layers=1, seed=5).save_pretrained(sdir)
    tok.save_pretrained(sdir)
    losses = {}
    for dt in ("float32", "bf16"):
        cfg = tiny_config(tmp_path, teacher=str(saved_teacher), student=str(sdir), output_dir=str(tmp_path / dt),
                          max_steps=2,
                          eval_teacher=False, teacher_dtype=dt, attn_implementation="eager",
                          teacher_load_kwargs={"low_cpu_mem_usage": True})
        d = Distiller(cfg)
        want = torch.bfloat16 if dt == "bf16" else torch.float32
        assert {p.dtype for p in d.teacher.parameters()} == {want}
        assert {p.dtype for p in d.student.parameters()} == {torch.float32}  # the student trains in float32
        assert d.teacher.config._attn_implementation == "eager"
        d.eval_sets = {}
        d.train()
        losses[dt] = [r["loss"] for r in train_records(cfg.output_dir)]
        assert all(math.isfinite(x) for x in losses[dt])
    assert losses["bf16"] == pytest.approx(losses["float32"], rel=2e-2)
    # device_map with offload: accelerate places the teacher (layer 1 offloaded to disk, loaded per
    # forward) and amid-distill leaves it there; the run matches the plain float32 one.
    pytest.importorskip("accelerate")
    dm = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
          "model.rotary_emb": "cpu", "lm_head": "cpu"}
    cfg = tiny_config(tmp_path, teacher=str(saved_teacher), student=str(sdir), output_dir=str(tmp_path / "dm"),
                      max_steps=2, eval_teacher=False, attn_implementation="eager",
                      teacher_load_kwargs={"device_map": dm, "offload_folder": str(tmp_path / "offload")})
    with pytest.raises(ConfigError, match="the teacher is offloaded"):  # no weights to build a student from
        Distiller(cfg.replace(student=None))
    d = Distiller(cfg)
    assert d.teacher.hf_device_map == dm
    assert d.teacher.model.layers[1].mlp.up_proj.weight.device.type == "meta"  # still offloaded
    d.eval_sets = {}
    d.train()
    assert [r["loss"] for r in train_records(cfg.output_dir)] == pytest.approx(losses["float32"], rel=1e-5)


def test_teacher_cache_is_bounded(tmp_path):
    tok = make_tokenizer()
    teacher = make_teacher(tok)
    sizes = {}
    for mb in (0.0, 0.004, 1024.0):
        cfg = tiny_config(tmp_path, output_dir=str(tmp_path / f"c{mb}"), max_steps=24, eval_teacher=False,
                          teacher_cache_mb=mb)
        d = Distiller(cfg, teacher=teacher, tokenizer=tok, student=make_model(len(tok), layers=1, seed=5))
        d.eval_sets = {}
        d.train()  # 24 steps of 4 = two epochs of the 48 examples
        nbytes = sum(t.numel() * t.element_size() for t in d._teacher_cache.values())
        assert nbytes == d._teacher_cache_bytes <= mb * 2**20
        sizes[mb] = (len(d._teacher_cache), [r["loss"] for r in train_records(cfg.output_dir)])
    assert sizes[0.0][0] == 0 and 0 < sizes[0.004][0] < 48 and sizes[1024.0][0] == 48
    # Caching never changes the result.
    assert sizes[0.004][1] == pytest.approx(sizes[0.0][1], rel=1e-6)
    assert sizes[1024.0][1] == pytest.approx(sizes[0.0][1], rel=1e-6)


# ------------------------------------------------------------------------------------------------
# Hub ids (offline: from the local Hugging Face cache) and data through `datasets` files.

def _fake_hub_cache(cache, repo_id, src):
    """A Hugging Face cache entry for repo_id holding the files of src (as huggingface_hub lays it out)."""
    import shutil

    entry = cache / ("models--" + repo_id.replace("/", "--"))
    snap = entry / "snapshots" / ("0" * 40)
    shutil.copytree(src, snap)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text("0" * 40)


def test_hub_ids_resolve_offline_from_the_cache(tmp_path, saved_teacher, monkeypatch, capsys):
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "someorg/tiny-teacher", saved_teacher)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    cfg = tiny_config(tmp_path, teacher="someorg/tiny-teacher", max_steps=1, eval_teacher=False)
    d = Distiller(cfg)
    assert d.teacher.config.num_hidden_layers == 2
    # A Hub id that is not in the cache: one line naming the field and the id, exit code 2.
    capsys.readouterr()
    assert distill_cli.main(["--teacher", "someorg/not-there", "--train-file", cfg.train_file, "--output-dir",
                             str(tmp_path / "o2"), "--no-progress"]) == 2
    err = one_line_error(capsys)
    assert "config field 'teacher': 'someorg/not-there' is neither a local directory nor in the Hugging Face " \
           "cache" in err, err


def test_data_from_parquet_and_hub_dataset_ids(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from test_distill import write_data

    from amid.distill.data import load_records

    paths = write_data(str(tmp_path / "data"))
    rows = [json.loads(x) for x in open(paths["train"])]
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "train.parquet"))
    assert load_records(str(tmp_path / "train.parquet")) == load_records(paths["train"])
    # TRL's prompt-completion rows are read too.
    trl_rows = [{"prompt": r["prompt"], "completion": r["response"], "answer": r["answer"]} for r in rows]
    pq.write_table(pa.Table.from_pylist(trl_rows), str(tmp_path / "trl.parquet"))
    assert load_records(str(tmp_path / "trl.parquet")) == load_records(paths["train"])
    # A Hub dataset id goes to datasets.load_dataset, with the split named after the field or given.
    datasets = pytest.importorskip("datasets")
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: calls.append((name, split)) or rows)
    assert load_records("someorg/letters", split="validation") == load_records(paths["train"])
    assert load_records("someorg/letters:dev") == load_records(paths["train"])
    assert calls == [("someorg/letters", "validation"), ("someorg/letters", "dev")]
    DistillConfig(teacher="smollm2", train_file="someorg/letters:train").validate()  # accepted as a source
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"the dataset 'someorg/not-there' is neither a local file nor loadable"):
        load_records("someorg/not-there")


# ------------------------------------------------------------------------------------------------
# The student built from teacher layers, and the meta-device build used by the sharded loader.

def test_student_from_teacher_layers_copies_only_the_kept_layers():
    from amid.distill import models as M

    tok = make_tokenizer()
    teacher = make_model(len(tok), layers=3, seed=4, tie=True)
    t_params = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    student = M.build_student_from_teacher(teacher, 2, [2, 0])
    assert len(teacher.model.layers) == 3 and teacher.config.num_hidden_layers == 3  # the teacher is untouched
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    assert student.lm_head.weight is student.model.embed_tokens.weight  # still tied
    for j, i in enumerate([2, 0]):
        assert student.model.layers[j].self_attn.layer_idx == j
        for n, p in student.model.layers[j].named_parameters():
            torch.testing.assert_close(p, t_params[f"model.layers.{i}.{n}"], rtol=0, atol=0)
            assert p.data_ptr() != teacher.model.layers[i].get_parameter(n).data_ptr()  # a copy
    # The sharded loader's path: a meta skeleton materialised from a weight source gives the same student.
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        meta = AutoModelForCausalLM.from_config(teacher.config)
    meta.tie_weights()
    skel, idx = M._student_skeleton(meta, 2, [2, 0])

    class Source:
        read_elements = 0

        def fill(self, name, shape, local, rows, dtype, prefix=""):
            local.copy_(t_params[name].to(dtype))

    layer = "model.layers."

    def teacher_name(n):
        if n.startswith(layer):
            j, rest = n[len(layer):].split(".", 1)
            return f"{layer}{idx[int(j)]}.{rest}"
        return n

    M._materialize(skel, Source(), torch.device("cpu"), torch.float32, teacher_name)
    assert skel.lm_head.weight is skel.model.embed_tokens.weight
    want = student.state_dict()
    got = skel.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    ids = torch.randint(0, len(tok), (2, 7))
    torch.testing.assert_close(skel(input_ids=ids).logits, student(input_ids=ids).logits, rtol=0, atol=0)
