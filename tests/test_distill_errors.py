"""amid-distill at the edges: bad output directories, broken model files, broken checkpoints, bad layer counts.

Each case must end in one clear line (a ``ConfigError``; exit code 2 from the CLI), never in a raw
traceback, a silent restart or a silent clamp.
"""
import os
import shutil

import pytest

pytest.importorskip("transformers")

from test_distill import (_one_thread, make_model, make_teacher, make_tokenizer, one_line_error,  # noqa: E402,F401
                         saved_teacher, tiny_config, train_records)

from amid.distill import ConfigError  # noqa: E402
from amid.distill import cli as distill_cli  # noqa: E402
from amid.distill.trainer import Distiller, checkpoint_problem  # noqa: E402



def _truncate(path, keep=0.5):
    n = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(n * keep))


def _flip_byte(path, at=-100):
    with open(path, "r+b") as f:
        f.seek(at, os.SEEK_END)
        b = f.read(1)
        f.seek(at, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))


# ------------------------------------------------------------------------------------------------
# Item 11: a student with more layers than the teacher is refused, not clamped.

def test_more_student_layers_than_teacher_layers_is_refused(tmp_path):
    tok = make_tokenizer()
    cfg = tiny_config(tmp_path, student_num_layers=3)  # the teacher has 2
    with pytest.raises(ConfigError, match=r"config field 'student_num_layers': expected at most the teacher's 2 "
                                          r"decoder layers .*but got 3"):
        Distiller(cfg, teacher=make_teacher(tok), tokenizer=tok)
    # As many layers as the teacher is allowed (a full copy).
    d = Distiller(tiny_config(tmp_path, student_num_layers=2), teacher=make_teacher(tok), tokenizer=tok)
    assert d.student.config.num_hidden_layers == 2


# ------------------------------------------------------------------------------------------------
# Item 10: the output directory is checked before any model is loaded; broken weights give one line.

def test_bad_output_dir_fails_first_with_one_line(tmp_path, saved_teacher, capsys):
    cfg = tiny_config(tmp_path)
    # Truncated teacher weights: had the models been loaded first, the teacher's error would come.
    broken = tmp_path / "broken_teacher"
    shutil.copytree(saved_teacher, broken)
    _truncate(broken / "model.safetensors")
    base = ["--teacher", str(broken), "--train-file", cfg.train_file, "--no-progress"]
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory\n")
    assert distill_cli.main(base + ["--output-dir", str(a_file)]) == 2
    err = one_line_error(capsys)
    assert f"config field 'output_dir': expected a directory, but '{a_file}' is a file" in err
    assert a_file.read_text() == "not a directory\n"  # nothing overwritten
    assert distill_cli.main(base + ["--output-dir", str(a_file / "sub")]) == 2
    err = one_line_error(capsys)
    assert f"config field 'output_dir': cannot create the directory '{a_file / 'sub'}'" in err
    # With a good output directory, the truncated teacher weights give one line naming the path.
    assert distill_cli.main(base + ["--output-dir", str(tmp_path / "out")]) == 2
    err = one_line_error(capsys)
    assert f"could not load the teacher from '{broken}'" in err and "SafetensorError" in err, err


# ------------------------------------------------------------------------------------------------
# Item 9: --resume takes the newest complete checkpoint and says which, or stops with one line.

@pytest.fixture
def two_checkpoints(tmp_path):
    """A finished 4-step run with checkpoints after steps 2 and 4."""
    tok = make_tokenizer()
    teacher = make_teacher(tok)
    cfg = tiny_config(tmp_path, max_steps=4, save_every=2, eval_teacher=False, output_dir=str(tmp_path / "run"))
    d = Distiller(cfg, teacher=teacher, tokenizer=tok, student=make_model(len(tok), layers=1, seed=5))
    d.eval_sets = {}
    d.train()
    root = cfg.output_dir
    names = sorted(n for n in os.listdir(root) if n.startswith("checkpoint-"))
    assert names == ["checkpoint-2", "checkpoint-4"]
    assert all(checkpoint_problem(os.path.join(root, n)) is None for n in names)
    return cfg, tok, teacher, [os.path.join(root, n) for n in names]


def _resume(cfg, tok, teacher):
    return Distiller(cfg.replace(resume=True), teacher=teacher, tokenizer=tok)


@pytest.mark.parametrize("damage", ["truncated_weights", "corrupt_state", "missing_state", "missing_weights"])
def test_resume_skips_a_broken_newest_checkpoint(two_checkpoints, damage, capsys):
    cfg, tok, teacher, (older, newest) = two_checkpoints
    if damage == "truncated_weights":
        _truncate(os.path.join(newest, "model.safetensors"))
        why = "model.safetensors has"
    elif damage == "corrupt_state":
        _flip_byte(os.path.join(newest, "trainer_state.json"))  # same size, different bytes
        why = "trainer_state.json does not match its SHA-256"
    elif damage == "missing_state":
        os.remove(os.path.join(newest, "trainer_state.json"))
        why = "trainer_state.json is missing"
    else:
        os.remove(os.path.join(newest, "model.safetensors"))
        why = "model.safetensors is missing"
    assert checkpoint_problem(newest) is not None
    capsys.readouterr()
    d = _resume(cfg, tok, teacher)
    out = capsys.readouterr().out
    assert d.step == 2
    assert f"skipped {newest}: {why}" in out, out
    assert f"resumed from {older} at step 2/4" in out, out


def test_resume_without_a_complete_checkpoint_stops_with_one_line(two_checkpoints, tmp_path, capsys):
    cfg, tok, teacher, ckpts = two_checkpoints
    for c in ckpts:
        os.remove(os.path.join(c, "trainer_state.json"))
    metrics = open(os.path.join(cfg.output_dir, "metrics.jsonl")).read()
    with pytest.raises(ConfigError, match=r"amid-distill: --resume: no complete checkpoint in .*checkpoint-4: "
                                          r"trainer_state.json is missing; .*checkpoint-2: trainer_state.json is missing"):
        _resume(cfg, tok, teacher)
    # The CLI gives the same as one line and exit code 2, and leaves the run's files alone.
    tdir = tmp_path / "teacher_for_cli"
    teacher.save_pretrained(tdir)
    tok.save_pretrained(tdir)
    capsys.readouterr()
    assert distill_cli.main(["--teacher", str(tdir), "--train-file", cfg.train_file, "--output-dir", cfg.output_dir,
                             "--student-num-layers", "1", "--resume", "--no-progress"]) == 2
    assert "no complete checkpoint" in one_line_error(capsys)
    assert open(os.path.join(cfg.output_dir, "metrics.jsonl")).read() == metrics
    assert len(train_records(cfg.output_dir)) == 4
    # No checkpoint at all: not a silent restart from step 0 either.
    for c in ckpts:
        shutil.rmtree(c)
    with pytest.raises(ConfigError, match=r"--resume: no checkpoint-N in .* to resume from"):
        _resume(cfg, tok, teacher)


def test_resume_from_a_checkpoint_without_manifest_with_unreadable_state(two_checkpoints):
    # A checkpoint written before manifests existed: a corrupt state file still gives one line.
    cfg, tok, teacher, (older, newest) = two_checkpoints
    os.remove(os.path.join(newest, "manifest.json"))
    assert checkpoint_problem(newest) is None
    with open(os.path.join(newest, "trainer_state.json"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(ConfigError, match=r"--resume: cannot read .*trainer_state.json: "):
        _resume(cfg, tok, teacher)


# ------------------------------------------------------------------------------------------------
# The "bad input" list through the CLI: unknown fields, wrong types, missing files, Hub ids
# offline, a resume path that is not a checkpoint. Each: one line naming the field or path, exit 2,
# and the output directory (which holds a file of an earlier attempt) left as it was.

def test_bad_input_through_the_cli_is_one_line_exit_2_and_touches_nothing(tmp_path, saved_teacher, capsys):
    cfg = tiny_config(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text("keep\n")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "a_file").write_text("x")

    def conf(name, text):
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        return ["--config", str(path)]

    base = ["--teacher", str(saved_teacher), "--train-file", cfg.train_file, "--output-dir", str(out),
            "--student-num-layers", "1", "--no-progress"]
    cases = [
        (conf("unknown", "kd_wieght: 0.5\n"), "unknown config field 'kd_wieght' (did you mean 'kd_weight'?)"),
        (conf("int", "max_steps: 2.5\n"), "config field 'max_steps': expected an integer >= 1 or null, but got 2.5"),
        (conf("bool", "overwrite_output_dir: perhaps\n"),
         "config field 'overwrite_output_dir': expected true or false, but got 'perhaps'"),
        (conf("str", "teacher_gguf_file: 5\n"), "config field 'teacher_gguf_file': expected a string or null, but got 5"),
        (conf("kwargs", "teacher_load_kwargs: [1]\n"), "config field 'teacher_load_kwargs': expected a mapping"),
        (conf("list", "- a\n"), "to hold a mapping of field names to values, but got list"),
        (conf("yaml", "a: [\n"), "is not valid YAML: while parsing a flow node"),
        (["--train-file", str(tmp_path / "nope.jsonl")], f"config field 'train_file': the file '{tmp_path / 'nope.jsonl'}'"
                                                          " does not exist"),
        (["--train-file", str(tmp_path / "empty_dir")], f"config field 'train_file': expected a data file, but "
                                                         f"'{tmp_path / 'empty_dir'}' is a directory"),
        (["--teacher", str(tmp_path / "a_file")], f"config field 'teacher': the teacher directory '{tmp_path / 'a_file'}'"),
        (["--student", "someorg/not-there"], "config field 'student': 'someorg/not-there' is neither a local directory "
                                             "nor in the Hugging Face cache"),
        (["--resume", str(saved_teacher)], f"config field 'resume': '{saved_teacher}' is not a complete checkpoint: it "
                                           "has no trainer_state.json"),
        (["--resume", str(tmp_path / "a_file")], "config field 'resume': the checkpoint directory"),
        (["--resume"], f"--resume: no checkpoint-N in '{out}'"),
    ]
    for extra, expected in cases:
        capsys.readouterr()
        assert distill_cli.main(base + extra) == 2, extra
        assert expected in one_line_error(capsys), (extra, expected)
    assert sorted(os.listdir(out)) == ["metrics.jsonl"] and (out / "metrics.jsonl").read_text() == "keep\n"
