"""amid.distill: the distillation loop on a tiny random Llama with a tokenizer built here (no files needed).

The helpers at the top (tokenizer, models, data) are also used by test_distill_torchrun.py.
"""
import copy
import json
import math
import os
import random

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("rouge_score")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

import amid  # noqa: E402
from amid.distill import (AdaptiveSGO, ConfigError, ConstantSchedule, DistillConfig, LinearSchedule,  # noqa: E402
                          ReplayBuffer, TAIDSchedule, exact_match, rouge_l, score_predictions)
from amid.distill import cli as distill_cli  # noqa: E402
from amid.distill.data import IGNORE_INDEX, StepSampler, collate_train, encode_records, load_records  # noqa: E402
from amid.distill.sgo import DATA, GENERATE, REPLAY  # noqa: E402
from amid.distill.trainer import Distiller  # noqa: E402

# ------------------------------------------------------------------------------------------------
# Tiny world: a word-level tokenizer with a chat template, random Llamas, letter-manipulation data.

LETTERS = list("abcdefghijklmnopqrstuvwxyz")
WORDS = ["reverse", "copy", "first", "last", "the", "answer", "is", "."]
SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>"]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def make_tokenizer(extra_words=()):
    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS + LETTERS + list(extra_words))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                  eos_token="<eos>",
                                  additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"])
    tok.chat_template = TEMPLATE
    return tok


def make_model(vocab_size, layers=2, hidden=32, seed=0, init=0.02, tie=False):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=init,
                      tie_word_embeddings=tie, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return LlamaForCausalLM(cfg)


_TEACHERS = {}


def make_teacher(tok):
    """A 2-layer teacher trained briefly (CE, ~1 s) on the letter tasks, so it has something to teach.

    Trained once per tokenizer size and copied for each test.
    """
    n = len(tok)
    if n not in _TEACHERS:
        model = make_model(n, layers=2, seed=1)
        recs = [{"messages": [{"role": "user", "content": r["prompt"]},
                              {"role": "assistant", "content": r["response"]}], "answer": None}
                for r in make_records(256, 10)]
        ex = encode_records(tok, recs, max_length=48)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(100):
            b = collate_train([{"input_ids": e.input_ids, "labels": e.labels}
                               for e in random.Random(step).sample(ex, 16)], tok.pad_token_id)
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        _TEACHERS[n] = model.eval()
    return copy.deepcopy(_TEACHERS[n])


def make_records(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        xs = rng.sample(LETTERS, rng.randint(2, 5))
        task = rng.choice(["reverse", "copy", "first", "last"])
        if task in ("reverse", "copy"):
            resp = " ".join(reversed(xs) if task == "reverse" else xs)
            ans = resp
        else:
            ans = xs[0] if task == "first" else xs[-1]
            resp = f"the answer is {ans} ."
        out.append({"prompt": f"{task} " + " ".join(xs), "response": resp, "answer": ans})
    return out


def write_jsonl(path, recs):
    with open(path, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")


def write_data(d, n_train=48, n_val=8, n_test=8):
    os.makedirs(d, exist_ok=True)
    paths = {}
    for name, n, seed in (("train", n_train, 0), ("validation", n_val, 1), ("test", n_test, 2)):
        paths[name] = os.path.join(d, f"{name}.jsonl")
        write_jsonl(paths[name], make_records(n, seed))
    return paths


def tiny_config(tmp_path, **kw):
    paths = write_data(str(tmp_path / "data"))
    base = dict(train_file=paths["train"], validation_file=paths["validation"], test_file=paths["test"],
                student_num_layers=1, max_steps=4, micro_batch_size=4, grad_accum_steps=1, lr=3e-3, max_length=48,
                eval_max_new_tokens=8, output_dir=str(tmp_path / "out"), progress=False, plots=False, seed=0)
    base.update(kw)
    return DistillConfig(**base)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on shared cores OpenMP barriers make them slow.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def one_line_error(capsys) -> str:
    """The CLI's stderr: one line starting with 'amid-distill', no traceback."""
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith("amid-distill"), err
    return err


@pytest.fixture
def saved_teacher(tmp_path):
    """The tiny teacher and its tokenizer saved as a Hugging Face model folder."""
    tok = make_tokenizer()
    d = tmp_path / "teacher"
    make_teacher(tok).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def train_records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == "train"]


# ------------------------------------------------------------------------------------------------
# The loop learns.

def test_loss_decreases_over_20_steps(tmp_path):
    tok = make_tokenizer()
    teacher = make_teacher(tok)
    student = make_model(len(tok), layers=1, seed=5)
    cfg = tiny_config(tmp_path, max_steps=20, lr=1e-2, kd_weight=1.0, alpha=0.5, lam=0.1, eval_teacher=False)
    d = Distiller(cfg, teacher=teacher, tokenizer=tok, student=student)
    d.eval_sets = {}  # no evaluation: only the training curve matters here
    summary = d.train()
    assert summary["steps"] == 20
    losses = [r["loss"] for r in train_records(cfg.output_dir)]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, losses


def test_student_from_teacher_layers_and_outputs(tmp_path):
    tok = make_tokenizer()
    teacher = make_teacher(tok)
    cfg = tiny_config(tmp_path, max_steps=3, kd_weight=0.5, eval_every=2, eval_generate_every=2, plots=True,
                      lam_schedule="linear", lam_start=0.2, lam_end=0.8)
    d = Distiller(cfg, teacher=teacher, tokenizer=tok)
    # The student holds copies of the chosen teacher layers (default for 1 of 2: the last one).
    assert d.student.config.num_hidden_layers == 1
    torch.testing.assert_close(d.student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[1].mlp.up_proj.weight)
    assert d.student.model.layers[0].self_attn.layer_idx == 0
    summary = d.train()
    out = cfg.output_dir
    for name in ("metrics.jsonl", "summary.md", "summary.json", "distill_config.json", "config.json",
                 "model.safetensors", "tokenizer.json", "README.md", "plots/loss.png", "plots/lambda.png",
                 "plots/rouge_l.png", "checkpoint-3/model.safetensors", "checkpoint-3/trainer_state.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert [r["model"] for r in summary["rows"]] == ["teacher", "student (before)", "student (after)"]
    # λ is logged per step: the linear schedule's value at steps 1, 2, 3 of 3.
    lams = [r["lam"] for r in train_records(out)]
    assert lams == pytest.approx([0.2, 0.4, 0.6])
    evals = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if '"eval"' in x]
    assert {(r["phase"], r["model"]) for r in evals} == {("before", "teacher"), ("before", "student"),
                                                          ("during", "student"), ("final", "student")}
    # The final student reloads as a plain HF model, from the output directory itself.
    reloaded = LlamaForCausalLM.from_pretrained(out)
    torch.testing.assert_close(reloaded.model.layers[0].mlp.up_proj.weight,
                               d.student.model.layers[0].mlp.up_proj.weight)


# ------------------------------------------------------------------------------------------------
# Gradient accumulation: the loss is normalised over the whole accumulated batch.

def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    tok = make_tokenizer()
    teacher = make_teacher(tok)
    cfg = tiny_config(tmp_path, kd_weight=0.5, alpha=-0.5, lam=0.3, divergence="ab", order="qr",
                      micro_batch_size=8, eval_teacher=False)
    d = Distiller(cfg, teacher=teacher, tokenizer=tok, student=make_model(len(tok), layers=1, seed=5))
    ex = [d.train_set[i] for i in range(8)]
    items = [{"input_ids": e.input_ids, "labels": e.labels} for e in ex]
    keys = [("train", i) for i in range(8)]
    n_resp = [sum(1 for x in e.labels[1:] if x != IGNORE_INDEX) for e in ex]

    def run(split):
        d.optimizer.zero_grad(set_to_none=True)
        mbs = [items[a:b] for a, b in split]
        ks = [keys[a:b] for a, b in split]
        d._accumulate(mbs, ks, ce_on=True)
        return _grads(d.student)

    big = run([(0, 8)])
    two = run([(0, 3), (3, 8)])
    four = run([(0, 1), (1, 2), (2, 5), (5, 8)])
    # The micro-batches have different numbers of response tokens, so per-micro-batch means would differ.
    assert sum(n_resp[0:3]) != sum(n_resp[3:8])
    for g in (two, four):
        assert g.keys() == big.keys()
        for n in big:
            torch.testing.assert_close(g[n], big[n], rtol=1e-4, atol=1e-6)
    # Control: averaging per-micro-batch means (the usual bug) gives a different gradient.
    d.optimizer.zero_grad(set_to_none=True)
    naive = {}
    for a, b in [(0, 3), (3, 8)]:
        d.optimizer.zero_grad(set_to_none=True)
        d._accumulate([items[a:b]], [keys[a:b]], ce_on=True)
        for n, g in _grads(d.student).items():
            naive[n] = naive.get(n, 0) + g / 2
    diff = max(float((naive[n] - big[n]).abs().max() / big[n].abs().max().clamp_min(1e-12)) for n in big)
    assert diff > 1e-2


# ------------------------------------------------------------------------------------------------
# Resume: interrupted + resumed == uninterrupted (with SGO, replay buffer and TAID's λ schedule).

def _resume_cfg(tmp_path, name, **kw):
    return tiny_config(tmp_path, output_dir=str(tmp_path / name), max_steps=6, save_every=3, eval_every=2,
                       kd_weight=0.7, student_gen=True, sgo_init_threshold=0.6, sgo_capacity=6, sgo_loss_eps=0.0,
                       lam_schedule="taid", lam_start=0.3, taid_step=0.05, gen_max_new_tokens=6, eval_teacher=False,
                       **kw)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    tok = make_tokenizer()
    teacher = make_teacher(tok)
    # Attention dropout in the student (copied from these layers; the teacher runs in eval mode) makes
    # the run depend on the restored RNG state too.
    teacher.config.attention_dropout = 0.2  # saved with the student's checkpoint, so the resumed copy has it too
    for m in teacher.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.2
    full = Distiller(_resume_cfg(tmp_path, "full"), teacher=teacher, tokenizer=tok)
    full.train()

    cfg = _resume_cfg(tmp_path, "split")
    first = Distiller(cfg, teacher=teacher, tokenizer=tok)
    assert first.train(stop_after=3) is None
    assert first.step == 3
    # A half-written checkpoint (a run killed while saving) is ignored.
    os.makedirs(os.path.join(cfg.output_dir, ".tmp-checkpoint-4"))
    del first
    second = Distiller(cfg.replace(resume=True), teacher=teacher, tokenizer=tok)
    assert second.step == 3
    second.train()

    sa, sb = full.student.state_dict(), second.student.state_dict()
    for n in sa:
        torch.testing.assert_close(sb[n], sa[n], rtol=1e-5, atol=1e-6)
    ra, rb = train_records(full.cfg.output_dir), train_records(cfg.output_dir)
    assert [r["step"] for r in rb] == list(range(1, 7))
    assert [r["batches"] for r in ra] == [r["batches"] for r in rb]
    assert [r["loss"] for r in rb] == pytest.approx([r["loss"] for r in ra], rel=1e-5)
    assert [r["lam"] for r in rb] == pytest.approx([r["lam"] for r in ra], rel=1e-6)
    assert full.sgo.state_dict()["counts"] == second.sgo.state_dict()["counts"]
    assert full.replay[0].state_dict()["items"] == second.replay[0].state_dict()["items"]
    assert len(full.replay[0]) > 0
    # Both runs actually exercised student generation and replay.
    kinds = {k for r in ra for k, v in r["batches"].items() if v}
    assert GENERATE in kinds


# ------------------------------------------------------------------------------------------------
# Adaptive student-generated outputs and the replay buffer.

def test_sgo_threshold_rises_only_when_validation_loss_worsens():
    sgo = AdaptiveSGO(init_threshold=0.0, loss_eps=0.1)
    assert sgo.observe(2.0) is False and sgo.ref_loss == 2.0  # the first value is the reference
    assert sgo.observe(1.8) is False and sgo.threshold == 0.0 and sgo.ref_loss == 1.8  # improving: new best
    assert sgo.observe(1.85) is False and sgo.threshold == 0.0  # worse than the best by less than eps
    assert sgo.observe(1.95) is True and sgo.threshold == pytest.approx(0.1) and sgo.ref_loss == 1.95
    assert sgo.observe(2.0) is False  # the reference moved up to the value that raised the threshold
    assert sgo.observe(2.1) is True and sgo.threshold == pytest.approx(0.2)
    for v in (2.3, 2.5, 2.7, 2.9, 3.1, 3.3, 3.5, 3.7, 3.9, 4.1, 4.3):
        sgo.observe(v)
    assert sgo.threshold == 1.0  # capped


def test_sgo_choice_follows_threshold_buffer_and_ratio():
    n = 4000
    zero = AdaptiveSGO(init_threshold=0.0, seed=1)
    assert {zero.choose(s, 100, 0, 10) for s in range(n)} == {DATA}
    one = AdaptiveSGO(init_threshold=1.0, seed=1)
    assert {one.choose(s, 100, 3, 10) for s in range(n)} == {GENERATE}  # buffer not full yet
    const = AdaptiveSGO(init_threshold=1.0, replay_ratio="constant", seed=1)
    kinds = [const.choose(50, 100, 10, 10) for _ in range(n)]
    assert abs(kinds.count(GENERATE) / n - 0.5) < 0.05 and kinds.count(DATA) == 0
    dec = AdaptiveSGO(init_threshold=1.0, replay_ratio="decreasing", seed=1)
    assert {dec.choose(100, 100, 10, 10) for _ in range(200)} == {REPLAY}  # decreasing: replay only at the end
    inc = AdaptiveSGO(init_threshold=1.0, replay_ratio="increasing", seed=1)
    assert {inc.choose(0, 100, 10, 10) for _ in range(200)} == {REPLAY}  # increasing: replay only at the start
    half = AdaptiveSGO(init_threshold=0.5, replay_ratio="constant", seed=2)
    kinds = [half.choose(0, 100, 10, 10) for _ in range(n)]
    assert abs(kinds.count(DATA) / n - 0.5) < 0.05
    assert abs(kinds.count(GENERATE) / n - 0.25) < 0.05 and abs(kinds.count(REPLAY) / n - 0.25) < 0.05
    assert half.generated_share == pytest.approx(1 - kinds.count(DATA) / n)


def test_replay_buffer_capacity_sampling_and_state():
    buf = ReplayBuffer(capacity=3, seed=0)
    buf.add([{"input_ids": [i], "labels": [i]} for i in range(5)])
    assert len(buf) == 3 and buf.full
    assert sorted(x["input_ids"][0] for x in buf.sample(3)) == [2, 3, 4]  # the oldest were dropped
    assert all(x["input_ids"][0] in (2, 3, 4) for x in buf.sample(10))
    clone = ReplayBuffer(capacity=3, seed=99)
    clone.load_state_dict(buf.state_dict())
    assert [buf.sample(2) for _ in range(5)] == [clone.sample(2) for _ in range(5)]
    with pytest.raises(RuntimeError, match="empty replay buffer"):
        ReplayBuffer(2).sample(1)


def test_trainer_student_generation_and_adaptive_switch(tmp_path, monkeypatch):
    tok = make_tokenizer()
    teacher = make_teacher(tok)
    cfg = tiny_config(tmp_path, max_steps=8, eval_every=1, student_gen=True, sgo_init_threshold=0.0,
                      sgo_loss_eps=0.05, sgo_capacity=8, sgo_replay_ratio="constant", gen_max_new_tokens=5,
                      gen_temperature=0.7, eval_teacher=False)
    d = Distiller(cfg, teacher=teacher, tokenizer=tok)
    # Validation CE that stops improving from step 2 on: the threshold must rise after each such eval.
    fake = iter([3.0] + [1.0] + [1.0 + 0.1 * k for k in range(1, 20)])

    def fake_eval(split, who="student", *, generate=True, phase="during"):
        ce = next(fake) if split == "validation" else 0.0
        rec = {"type": "eval", "phase": phase, "step": d.step, "split": split, "model": who, "ce": ce, "kl": 0.0}
        d._log(rec)
        return rec

    monkeypatch.setattr(d, "evaluate", fake_eval)
    seen = []
    orig = d._step_items

    def spy():
        kind, items, keys = orig()
        seen.append((kind, d.sgo.threshold, items))
        return kind, items, keys

    monkeypatch.setattr(d, "_step_items", spy)
    d.train()
    thresholds = [t for _, t, _ in seen]
    assert thresholds[0] == 0.0 and thresholds[1] == 0.0  # step 1 improved 3.0 -> 1.0
    assert thresholds[2:] == pytest.approx([0.1 * k for k in range(1, 7)])
    assert seen[0][0] == DATA and seen[1][0] == DATA
    gen_steps = [items for kind, _, items in seen if kind == GENERATE]
    assert gen_steps, [k for k, _, _ in seen]
    for mb in gen_steps[0]:
        for it in mb:
            lab = it["labels"]
            n_prompt = sum(1 for x in lab if x == IGNORE_INDEX)
            assert lab[:n_prompt] == [IGNORE_INDEX] * n_prompt
            assert lab[n_prompt:] == it["input_ids"][n_prompt:] and 1 <= len(lab) - n_prompt <= 5
    assert 0 < d.replay_size <= 8
    recs = train_records(cfg.output_dir)
    assert recs[-1]["sgo_threshold"] == pytest.approx(0.6) and "replay_size" in recs[-1]


# ------------------------------------------------------------------------------------------------
# λ schedules.

def test_lambda_schedules():
    c = ConstantSchedule(0.3)
    c.step(1.0, 5, 10)
    assert c.value == 0.3
    lin = LinearSchedule(0.1, 0.9)
    assert lin.value == 0.1
    lin.step(None, 5, 10)
    assert lin.value == pytest.approx(0.5)
    lin.step(None, 20, 10)
    assert lin.value == pytest.approx(0.9)

    t = TAIDSchedule(t_start=0.4, t_end=1.0, step_size=0.1, momentum=0.5)
    t.step(2.0, 1, 100)  # the first call only records the loss
    assert t.value == 0.4
    t.step(1.0, 2, 100)
    # rel = 0.5, m = 0.25, Δ = 0.1 · sigmoid(0.25) · 0.6 = 0.0337306; linear target 0.412
    assert t.value == pytest.approx(0.4 + 0.1 * (1 / (1 + math.exp(-0.25))) * 0.6)
    st = t.state_dict()
    t2 = TAIDSchedule(t_start=0.4, t_end=1.0, step_size=0.1, momentum=0.5)
    t2.load_state_dict(st)
    vals = []
    for k, loss in enumerate([0.9, 1.5, 1.4, 3.0, 0.5] * 20, start=3):
        t.step(loss, k, 100)
        t2.step(loss, k, 100)
        vals.append(t.value)
        assert t.value == t2.value
        assert t.value >= 0.4 + 0.6 * min(1.0, k / 100) - 1e-12 and t.value <= 1.0
    assert all(b >= a for a, b in zip(vals, vals[1:]))  # never decreases
    assert vals[-1] == pytest.approx(1.0)
    # A falling loss moves t faster than a rising one.
    down, up = TAIDSchedule(step_size=0.05), TAIDSchedule(step_size=0.05)
    for k in range(1, 6):
        down.step(10.0 / k, k, 10 ** 6)
        up.step(float(k), k, 10 ** 6)
    assert down.value > up.value > 0.4
    fixed = TAIDSchedule(0.4, 1.0, adaptive=False)
    fixed.step(None, 50, 100)
    assert fixed.value == pytest.approx(0.7)


# ------------------------------------------------------------------------------------------------
# Evaluation.

def test_metrics_on_known_answers():
    # LCS("a b c d", "a c d e") = 3: P = R = 3/4, F = 0.75.
    assert rouge_l(["a b c d"], ["a c d e"]) == pytest.approx(75.0)
    assert rouge_l(["The capital is Paris."], ["the capital is paris"]) == pytest.approx(100.0)
    assert rouge_l([""], ["x y"]) == 0.0
    # Two of four exact after normalisation (case, punctuation, articles, spaces).
    preds = ["The answer is 42.", "an apple", "12 + 5 = 17", "no"]
    refs = ["answer is 42", "Apple!", "12 + 5 = 18.", "yes"]
    assert exact_match(preds, refs) == pytest.approx(50.0)
    s = score_predictions(preds, refs, ["42", "apple", "18", None])
    assert s["answer_acc"] == pytest.approx(200 / 3)  # 42 and apple found, 18 not; None skipped
    # ROUGE-L per pair on rouge-score's tokens (no article removal):
    # [the answer is 42] vs [answer is 42]: P 3/4, R 1 -> 6/7; [an apple] vs [apple]: 2/3;
    # [12 5 17] vs [12 5 18]: 2/3; [no] vs [yes]: 0.
    assert s["rouge_l"] == pytest.approx(100 * (6 / 7 + 2 / 3 + 2 / 3 + 0) / 4)
    assert rouge_l(["3 letters"], ["3 letter"]) == pytest.approx(100.0)  # Porter stemming, as in MiniLLM/DistiLLM


def test_evaluate_scores_a_known_answer_set(tmp_path, monkeypatch):
    """Generation is replaced by a fake that answers half of the prompts exactly and the rest with EOS."""
    tok = make_tokenizer()
    cfg = tiny_config(tmp_path, eval_batch_size=3, eval_teacher=False)
    d = Distiller(cfg, teacher=make_teacher(tok), tokenizer=tok)
    data = d.eval_sets["test"]
    answer_of = {tuple(e.prompt_ids): (i, e) for i, e in enumerate(data)}
    from amid.distill import trainer as trainer_mod

    def fake_generate(model, prompts, **kw):
        out = []
        for p in prompts:
            i, e = answer_of[tuple(p)]
            out.append(e.input_ids[len(e.prompt_ids):] if i % 2 == 0 else [tok.eos_token_id])
        return out

    monkeypatch.setattr(trainer_mod, "generate_ids", fake_generate)
    rec = d.evaluate("test", "student", generate=True, phase="final")
    assert rec["exact_match"] == pytest.approx(50.0)
    assert rec["rouge_l"] == pytest.approx(50.0)
    assert rec["answer_acc"] == pytest.approx(50.0)
    assert rec["ce"] > 0 and rec["kl"] >= 0
    with open(os.path.join(cfg.output_dir, "predictions", "final-step000000-student-test.jsonl")) as f:
        preds = [json.loads(x) for x in f]
    assert [p["reference"] for p in preds] == [e.reference for e in data]
    assert preds[0]["prediction"] == data[0].reference
    # Token-level KL of the teacher against itself is not reported; its CE is.
    trec = d.evaluate("validation", "teacher", generate=False)
    assert trec["kl"] is None and trec["ce"] > 0


# ------------------------------------------------------------------------------------------------
# Vocabularies: padded heads are masked; different tokenizers are refused.

def _pad_head(model, new_v, big=30.0):
    """Grow the output head to ``new_v`` rows whose logits would dominate if they were not masked."""
    old = model.lm_head.weight.data
    w = torch.zeros(new_v, old.shape[1])
    w[: old.shape[0]] = old
    w[old.shape[0]:] = big * torch.sign(torch.randn(new_v - old.shape[0], old.shape[1]))
    model.lm_head = torch.nn.Linear(old.shape[1], new_v, bias=False)
    model.lm_head.weight.data = w
    model.config.vocab_size = new_v
    emb = model.model.embed_tokens
    e = torch.zeros(new_v, emb.weight.shape[1])
    e[: emb.weight.shape[0]] = emb.weight.data
    model.model.embed_tokens = torch.nn.Embedding(new_v, emb.weight.shape[1])
    model.model.embed_tokens.weight.data = e
    return model


def test_padded_vocabularies_are_masked(tmp_path):
    tok = make_tokenizer()
    n = len(tok)

    def first_loss(teacher, student, name):
        cfg = tiny_config(tmp_path, output_dir=str(tmp_path / name), max_steps=1, kd_weight=0.5, eval_teacher=False)
        d = Distiller(cfg, teacher=teacher, tokenizer=tok, student=student)
        assert d.n_vocab == n
        out = d.train_step()
        return float(out["sums"]["loss"]), d

    base_loss, _ = first_loss(make_teacher(tok), make_model(n, layers=1, seed=5), "plain")
    padded_loss, d = first_loss(_pad_head(make_teacher(tok), n + 5), _pad_head(make_model(n, layers=1, seed=5), n + 21),
                                "padded")
    assert d.v_teacher == n + 5 and d.v_student == n + 21
    assert padded_loss == pytest.approx(base_loss, rel=1e-5)
    # Greedy generation never emits a padding row, although those logits are the largest.
    ids = d._gen_call([e.prompt_ids for e in d.eval_sets["test"][:4]], do_sample=False, max_new_tokens=6)
    assert all(0 <= t < n for seq in ids for t in seq)


def test_different_tokenizers_are_refused(tmp_path):
    tok = make_tokenizer()
    other_tok = make_tokenizer(extra_words=["zzz", "yyy"])
    sdir = tmp_path / "student"
    make_model(len(other_tok), layers=1).save_pretrained(sdir)
    other_tok.save_pretrained(sdir)
    cfg = tiny_config(tmp_path, student=str(sdir))
    with pytest.raises(ConfigError, match="tokenizers differ"):
        Distiller(cfg, teacher=make_teacher(tok), tokenizer=tok)


# ------------------------------------------------------------------------------------------------
# Bad configs give clear errors.

def test_bad_configs(tmp_path, capsys):
    paths = write_data(str(tmp_path / "data"))
    with pytest.raises(ConfigError, match=r"amid-distill: config field 'teacher': the teacher directory '/no/such/dir' "
                                          "does not exist"):
        DistillConfig(teacher="/no/such/dir", train_file=paths["train"]).validate()
    tdir = tmp_path / "teacher"
    tok = make_tokenizer()
    make_teacher(tok).save_pretrained(tdir)
    tok.save_pretrained(tdir)
    with pytest.raises(ConfigError, match=r"config field 'train_file': the file '/no/train.jsonl' does not exist"):
        DistillConfig(teacher=str(tdir), train_file="/no/train.jsonl").validate()
    with pytest.raises(ConfigError, match=r"config field 'kd_weight': expected a number in \[0.0, 1.0\], but got 1.5"):
        DistillConfig(teacher=str(tdir), train_file=paths["train"], kd_weight=1.5).validate()
    with pytest.raises(ConfigError, match=r"config field 'kd_weight'.*but got -0.1"):
        DistillConfig(teacher=str(tdir), train_file=paths["train"], kd_weight=-0.1).validate()
    with pytest.raises(ConfigError,
                       match=r"config field 'order': expected one of 'pr', 'qr', 'rp', 'rq', 'jsd', but got 'pq'"):
        DistillConfig(teacher=str(tdir), train_file=paths["train"], order="pq").validate()
    with pytest.raises(ConfigError, match="detach_assistant"):
        DistillConfig(teacher=str(tdir), train_file=paths["train"], detach_assistant=True, order="pr").validate()
    with pytest.raises(ConfigError, match=r"unknown config field 'kd_wieght' \(did you mean 'kd_weight'\?\)"):
        DistillConfig.from_dict({"kd_wieght": 0.5})
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(f"teacher: {tdir}\ntrain_file: {paths['train']}\nkd_weight: 3\n")
    assert distill_cli.main(["--config", str(bad_yaml)]) == 2
    assert "config field 'kd_weight'" in capsys.readouterr().err
    assert distill_cli.main(["--teacher", str(tmp_path / "missing"), "--train-file", paths["train"]]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"question": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 1: expected keys 'prompt' and 'response', or 'messages'"):
        load_records(str(bad_data))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepSampler(3, micro_batch_size=2, grad_accum_steps=2)


def test_cli_config_file_and_flags(tmp_path):
    paths = write_data(str(tmp_path / "data"))
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"teacher: /x\ntrain_file: {paths['train']}\nkd_weight: 0.25\nlam_schedule: taid\n"
                        "student_layers: [0, 3]\nbf16: false\n")
    cfg = distill_cli.resolve_config(["--config", str(cfg_file), "--max-steps", "7", "--no-plots", "--lam-start", "0.5",
                                      "--student-layers", "1,2", "--chunk-size", "none"])
    assert (cfg.kd_weight, cfg.lam_schedule, cfg.max_steps, cfg.plots, cfg.lam_start) == (0.25, "taid", 7, False, 0.5)
    assert cfg.student_layers == [1, 2] and cfg.bf16 == "false" and cfg.chunk_size is None
    demo = distill_cli.resolve_config(["--demo", "--max-steps", "2", "--output-dir", str(tmp_path / "d")])
    assert demo.teacher == "smollm2" and demo.max_steps == 2 and os.path.isfile(demo.train_file)


# ------------------------------------------------------------------------------------------------
# Data: chat messages, system prompts and prompt masking.

def test_chat_messages_and_prompt_masking(tmp_path):
    tok = make_tokenizer()
    p = tmp_path / "chat.jsonl"
    write_jsonl(str(p), [{"messages": [{"role": "system", "content": "copy"},
                                       {"role": "user", "content": "copy a b"},
                                       {"role": "assistant", "content": "a b"}]},
                         {"prompt": "first c d", "response": "the answer is c .", "answer": "c"}])
    ex = encode_records(tok, load_records(str(p)), system_prompt="reverse", max_length=64)
    assert len(ex) == 2
    for e in ex:
        k = len(e.prompt_ids)
        assert e.input_ids[:k] == e.prompt_ids
        assert e.labels[:k] == [IGNORE_INDEX] * k and all(x != IGNORE_INDEX for x in e.labels[k:])
    assert tok.decode(ex[0].prompt_ids) == "<|system|> copy <eos> <|user|> copy a b <eos> <|assistant|>"
    assert tok.decode(ex[0].labels[len(ex[0].prompt_ids):]) == "a b <eos>"
    # The system prompt from the config is added only where the record has none.
    assert tok.decode(ex[1].prompt_ids).startswith("<|system|> reverse <eos> <|user|> first c d")
    assert ex[1].answer == "c"


def test_sampler_shards_the_same_global_batches():
    one = StepSampler(20, micro_batch_size=2, grad_accum_steps=2, world_size=1, seed=3)
    ranks = [StepSampler(20, micro_batch_size=2, grad_accum_steps=1, world_size=2, rank=r, seed=3) for r in range(2)]
    for _ in range(12):  # crosses an epoch boundary (5 steps per epoch)
        a = sorted(i for mb in one.next_step() for i in mb)
        b = sorted(i for s in ranks for mb in s.next_step() for i in mb)
        assert a == b and len(set(a)) == 4
    assert one.epoch == 2


# ------------------------------------------------------------------------------------------------
# Precision and the fused-linear path.


@pytest.mark.parametrize("fused", [False, True])
def test_bf16_autocast_runs_on_cpu(tmp_path, fused):
    tok = make_tokenizer()
    cfg = tiny_config(tmp_path, max_steps=2, bf16="true", kd_weight=0.5, eval_teacher=False, fused_linear=fused)
    d = Distiller(cfg, teacher=make_teacher(tok), tokenizer=tok)
    assert d.use_bf16
    d.eval_sets = {}
    d.train()
    assert all(math.isfinite(r["loss"]) for r in train_records(cfg.output_dir))


def test_fused_linear_path_matches_unfused(tmp_path):
    tok = make_tokenizer()
    teacher = make_teacher(tok)
    grads = {}
    for fused in (False, True):
        cfg = tiny_config(tmp_path, output_dir=str(tmp_path / f"f{fused}"), kd_weight=0.6, alpha=0.5, lam=0.2,
                          divergence="kl", order="rq", fused_linear=fused, chunk_size=7, eval_teacher=False)
        d = Distiller(cfg, teacher=teacher, tokenizer=tok, student=make_model(len(tok), layers=1, seed=5))
        items = [{"input_ids": d.train_set[i].input_ids, "labels": d.train_set[i].labels} for i in range(6)]
        d.optimizer.zero_grad(set_to_none=True)
        sums = d._accumulate([items[:2], items[2:]], [[("train", i) for i in range(2)],
                                                      [("train", i) for i in range(2, 6)]], ce_on=True)
        grads[fused] = (_grads(d.student), float(sums["loss"]))
    assert grads[True][1] == pytest.approx(grads[False][1], rel=1e-5)
    for n, g in grads[False][0].items():
        torch.testing.assert_close(grads[True][0][n], g, rtol=1e-4, atol=1e-6)
