"""amid.integrations (issue 11, item 7): HF Trainer compute_loss_func and callbacks, TRL's GKD trainer
with amid's loss, LoRA through peft. CPU, offline, tiny random Llamas made here."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import amid

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator  # noqa: E402

from amid.distill import AdaptiveSGO, LinearSchedule, TAIDSchedule  # noqa: E402
from amid.integrations.hf import AdaptiveSGOCallback, AMiDComputeLoss, LambdaScheduleCallback  # noqa: E402

VOCAB, SEQ, NSAMP = 48, 10, 8
OPTS = dict(alpha=0.5, lam=0.3, divergence="ab", order="pr")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models and tensors: one intra-op thread is fastest, and keeps the suite quick on a busy machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama(seed, hidden=32, layers=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).float()


def samples(n=NSAMP, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (SEQ,), generator=g)
        prompt = 3 + i % 3
        labels = ids.clone()
        labels[:prompt] = -100  # prompt tokens masked, as in a distillation dataset
        out.append({"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels})
    return out


def batch_of(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def hand_loss(student, teacher, batch, kd_weight, lam=OPTS["lam"]):
    """The objective written out: kd·AMiD + (1-kd)·CE over shifted positions, / kept tokens."""
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    y = batch["labels"][:, 1:]
    n = (y != -100).sum()
    kd = amid.reference.amid_loss_rows(logits.reshape(-1, VOCAB).double(), t.reshape(-1, VOCAB).double(),
                                       **dict(OPTS, lam=lam)).reshape(y.shape)
    kd = torch.where(y != -100, kd, 0.0).sum() / n
    ce = F.cross_entropy(logits.reshape(-1, VOCAB).double(), y.reshape(-1), ignore_index=-100, reduction="sum") / n
    return kd_weight * kd + (1 - kd_weight) * ce


def hand_step(student, teacher, rows, kd_weight, lr):
    """One plain SGD step with the Trainer's gradient clipping (norm 1). SGD, not Adam: Adam's first
    step is ~lr·sign(g), which would magnify float32 rounding of tiny gradient entries."""
    student = copy.deepcopy(student).train()
    opt = torch.optim.SGD(student.parameters(), lr=lr)
    loss = hand_loss(student, teacher, batch_of(rows), kd_weight)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    return student, float(loss.detach())


def args_for(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                learning_rate=1e-3, max_steps=1, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0,
                optim="sgd")
    base.update(kw)
    return TrainingArguments(**base)


def max_param_diff(a, b):
    return max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))


# ---- HF Trainer ----------------------------------------------------------------------------------

def test_hf_trainer_step_equals_hand_written_step(tmp_path):
    student, teacher = tiny_llama(1), tiny_llama(2, hidden=48)
    rows = samples()
    want, want_loss = hand_step(student, teacher, rows, kd_weight=0.5, lr=0.5)
    loss_fn = AMiDComputeLoss(teacher, student, kd_weight=0.5, **OPTS)
    # the whole data set is one optimizer step (2 micro-batches of 4): the order inside the step does
    # not matter because both micro-batches are divided by the step's kept-token count
    trainer = Trainer(model=student, args=args_for(tmp_path, learning_rate=0.5), train_dataset=rows,
                      data_collator=default_data_collator, compute_loss_func=loss_fn)
    trainer.train()
    assert max_param_diff(student, want) < 1e-6
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert math.isclose(logged[0], want_loss, rel_tol=1e-5)


def test_hf_trainer_loss_decreases_with_schedule_callbacks(tmp_path):
    student, teacher = tiny_llama(1), tiny_llama(2, hidden=48)
    rows = samples()
    loss_fn = AMiDComputeLoss(teacher, student, kd_weight=1.0, **OPTS)
    seen = []
    orig = loss_fn.__call__

    class Spy:
        def __call__(self, *a, **k):
            seen.append(loss_fn.lam)
            return orig(*a, **k)

    sched = LinearSchedule(0.1, 0.5)
    taid = TAIDSchedule()
    trainer = Trainer(model=student, args=args_for(tmp_path, max_steps=4, learning_rate=1e-2,
                                                   gradient_accumulation_steps=1, per_device_train_batch_size=8),
                      train_dataset=rows, data_collator=default_data_collator, compute_loss_func=Spy(),
                      callbacks=[LambdaScheduleCallback(sched, loss_fn)])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0] * 0.9, losses
    # λ followed the linear schedule: 0.1 at step 0, then +0.4/4 per step
    assert seen == pytest.approx([0.1 + 0.4 * i / 4 for i in range(4)])
    assert loss_fn.lam == pytest.approx(0.5)
    # TAID's adaptive schedule reads the step loss the loss object recorded
    loss_fn2 = AMiDComputeLoss(teacher, student, kd_weight=1.0, **OPTS)
    trainer = Trainer(model=student, args=args_for(tmp_path, max_steps=2, gradient_accumulation_steps=2),
                      train_dataset=rows, data_collator=default_data_collator, compute_loss_func=loss_fn2,
                      callbacks=[LambdaScheduleCallback(taid, loss_fn2)])
    trainer.train()
    assert taid.prev_loss is not None and taid.t >= 0.4 and loss_fn2.lam == taid.t


def test_hf_vocab_size_and_errors():
    student, teacher = tiny_llama(1), tiny_llama(2)
    teacher.resize_token_embeddings(VOCAB + 16)  # teacher head padded further (same tokenizer)
    b = batch_of(samples(4))
    loss_fn = AMiDComputeLoss(teacher, student, kd_weight=0.7, vocab_size=VOCAB, **OPTS)
    out = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    got = loss_fn(out, b["labels"], num_items_in_batch=None).detach()
    with pytest.raises(RuntimeError, match="no teacher logits for this batch"):
        loss_fn(out, b["labels"])  # the teacher ran once, for the one student forward
    teacher_cut = lambda **kw: type("O", (), {"logits": teacher(**kw).logits[..., :VOCAB]})()  # noqa: E731
    want = hand_loss(student, teacher_cut, b, 0.7)
    assert math.isclose(float(got), float(want), rel_tol=1e-5)
    with pytest.raises(ValueError, match="expected kd_weight in \\[0, 1\\], but got 1.5"):
        AMiDComputeLoss(teacher, kd_weight=1.5)


def test_adaptive_sgo_callback_drives_lmbda():
    class State:
        global_step, max_steps = 0, 10

    class Target:
        lmbda = None

    sgo = AdaptiveSGO(init_threshold=0.0, loss_eps=0.1, replay_ratio="constant")
    tgt = Target()
    cb = AdaptiveSGOCallback(sgo, tgt)
    cb.on_train_begin(None, State(), None)
    assert tgt.lmbda == 0.0
    cb.on_evaluate(None, State(), None, metrics={"eval_loss": 2.0})  # reference
    cb.on_evaluate(None, State(), None, metrics={"eval_loss": 2.5})  # worse by >= eps: threshold rises
    assert sgo.threshold == pytest.approx(0.1) and tgt.lmbda == pytest.approx(0.05)
    cb.on_evaluate(None, State(), None, metrics={"eval_loss": 1.0})  # improving: unchanged
    assert sgo.threshold == pytest.approx(0.1)
    logs = {}
    cb.on_log(None, State(), None, logs=logs)
    assert logs == {"amid_sgo_threshold": pytest.approx(0.1)}


def test_hf_trainer_with_lora(tmp_path):
    peft = pytest.importorskip("peft")
    student, teacher = tiny_llama(1), tiny_llama(2, hidden=48)
    student = peft.get_peft_model(student, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           lora_dropout=0.0))
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    loss_fn = AMiDComputeLoss(teacher, student, kd_weight=0.5, **OPTS)
    trainer = Trainer(model=student, args=args_for(tmp_path, max_steps=5, learning_rate=5e-2,
                                                   gradient_accumulation_steps=1, per_device_train_batch_size=8),
                      train_dataset=samples(), data_collator=default_data_collator, compute_loss_func=loss_fn)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0], losses
    for n, p in student.named_parameters():  # only the adapters moved
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


# ---- TRL ---------------------------------------------------------------------------------------------

def _tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _gkd(tmp_path, student, teacher, rows, **kw):
    pytest.importorskip("trl")
    from amid.integrations.trl import AMiDGKDConfig, AMiDGKDTrainer

    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in rows])
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                learning_rate=1e-3, max_steps=1, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True, lmbda=0.0, max_length=SEQ,
                optim="sgd",
                amid_alpha=OPTS["alpha"], amid_lam=OPTS["lam"], amid_divergence=OPTS["divergence"],
                amid_order=OPTS["order"], amid_kd_weight=0.5, bf16=False)
    base.update(kw)
    args = AMiDGKDConfig(**base)
    return AMiDGKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                          data_collator=default_data_collator, processing_class=_tokenizer())


@pytest.mark.parametrize("fused", [True, False])
def test_trl_gkd_step_equals_hand_written_step(tmp_path, fused):
    student, teacher = tiny_llama(1), tiny_llama(2, hidden=48)
    rows = samples()
    want, want_loss = hand_step(student, teacher, rows, kd_weight=0.5, lr=0.5)
    trainer = _gkd(tmp_path, student, teacher, rows, amid_fused_linear=fused, learning_rate=0.5)
    trainer.train()
    assert max_param_diff(trainer.model, want) < 1e-6
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert math.isclose(logs[0]["loss"], want_loss, rel_tol=1e-5)
    assert "amid_kd" in logs[0] and "amid_ce" in logs[0] and logs[0]["amid_lambda"] == pytest.approx(OPTS["lam"])


def test_trl_gkd_lora_decreases_and_schedule(tmp_path):
    peft = pytest.importorskip("peft")
    student, teacher = tiny_llama(1), tiny_llama(2, hidden=48)
    student = peft.get_peft_model(student, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           lora_dropout=0.0))
    trainer = _gkd(tmp_path, student, teacher, samples(), max_steps=5, learning_rate=5e-2,
                   gradient_accumulation_steps=1, per_device_train_batch_size=8)
    sched = LinearSchedule(0.1, 0.9)
    trainer.add_callback(LambdaScheduleCallback(sched, trainer))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0], losses
    assert trainer.lam == pytest.approx(0.9)


def test_trl_distillation_trainer_fused_loss(tmp_path):
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from amid.integrations.trl import AMiDDistillationConfig, AMiDDistillationTrainer

    student, teacher = tiny_llama(1), tiny_llama(2, hidden=48)
    tok = _tokenizer()
    tok.padding_side = "left"
    ds = datasets.Dataset.from_list([{"prompt": " ".join(f"w{3 + (i * 7 + j) % 40}" for j in range(3 + i % 3))}
                                     for i in range(4)])
    args = AMiDDistillationConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2,
                                  max_steps=2, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", seed=0,
                                  disable_tqdm=True, max_completion_length=5, amid_kd_weight=0.5, bf16=False,
                                  amid_alpha=OPTS["alpha"], amid_lam=OPTS["lam"], amid_divergence=OPTS["divergence"],
                                  amid_order=OPTS["order"], amid_chunk_size=3)
    trainer = AMiDDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                                      processing_class=tok)
    # the loss on one (prompt, completion) batch against the objective written out on full logits
    g = torch.Generator().manual_seed(0)
    inputs = {"prompt_ids": torch.randint(3, VOCAB, (2, 4), generator=g), "prompt_mask": torch.ones(2, 4, dtype=torch.long),
              "completion_ids": torch.randint(3, VOCAB, (2, 5), generator=g),
              "completion_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}
    loss, _entropy, n_valid = trainer._compute_loss(student, inputs, None)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    labels = torch.cat([torch.full((2, 4), -100), inputs["completion_ids"].masked_fill(inputs["completion_mask"] == 0,
                                                                                      -100)], 1)
    want = hand_loss(student, teacher, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}, 0.5)
    assert int(n_valid) == 8 and math.isclose(float(loss), float(want), rel_tol=1e-5)
    # a short on-policy run trains and logs the two terms
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) and h["amid_kd"] > 0 and h["amid_ce"] > 0 for h in logs)


def test_hf_hook_skips_generation():
    student, teacher = tiny_llama(1), tiny_llama(2)
    calls = []
    teacher.register_forward_pre_hook(lambda m, a: calls.append(1))
    AMiDComputeLoss(teacher, student)
    ids = batch_of(samples(2))["input_ids"][:, :4]
    student.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                     pad_token_id=0)
    assert calls == []  # generate() asks for a KV cache: the teacher is not run


def test_schedule_state_in_checkpoints(tmp_path):
    student, teacher = tiny_llama(1), tiny_llama(2)
    loss_fn = AMiDComputeLoss(teacher, student, **OPTS)
    taid = TAIDSchedule()
    cb = LambdaScheduleCallback(taid, loss_fn)
    trainer = Trainer(model=student, args=args_for(tmp_path, max_steps=2, save_strategy="steps", save_steps=1,
                                                   gradient_accumulation_steps=1, per_device_train_batch_size=8),
                      train_dataset=samples(), data_collator=default_data_collator, compute_loss_func=loss_fn,
                      callbacks=[cb])
    trainer.train()
    after_two = taid.state_dict()
    fresh = TAIDSchedule()
    LambdaScheduleCallback(fresh, loss_fn).load_checkpoint(str(tmp_path / "checkpoint-2"))
    assert fresh.state_dict() == after_two and loss_fn.lam == after_two["t"]
    one = TAIDSchedule()
    LambdaScheduleCallback(one, loss_fn).load_checkpoint(str(tmp_path / "checkpoint-1"))
    assert one.state_dict() != after_two and one.prev_loss is not None  # the state as of step 1


def test_trl_gkd_on_policy_with_sgo_callback(tmp_path):
    """GKD's own on-policy path (student generations, TRL's chat collator) with amid's loss; the
    adaptive SGO callback sets the trainer's lmbda."""
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from amid.integrations.trl import AMiDGKDConfig, AMiDGKDTrainer

    student, teacher = tiny_llama(1), tiny_llama(2, hidden=48)
    tok = _tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    rows = [{"messages": [{"role": "user", "content": " ".join(f"w{3 + (i * 5 + j) % 40}" for j in range(3))},
                          {"role": "assistant", "content": " ".join(f"w{3 + (i * 3 + j) % 40}" for j in range(4))}]}
            for i in range(8)]
    args = AMiDGKDConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=2,
                         report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
                         lmbda=0.0, max_new_tokens=4, max_length=32, bf16=False, amid_kd_weight=1.0)
    trainer = AMiDGKDTrainer(model=student, teacher_model=teacher, args=args,
                             train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    generated = []
    orig = trainer.generate_on_policy_outputs

    def counting(*a, **k):
        out = orig(*a, **k)
        generated.append(out[0].shape)
        return out

    trainer.generate_on_policy_outputs = counting
    sgo = AdaptiveSGO(init_threshold=1.0, replay_ratio="decreasing")  # share = 1 - step / max_steps
    trainer.add_callback(AdaptiveSGOCallback(sgo, trainer))
    trainer.train()
    # step 0: lmbda = 1 (GKD always generates); step 1: lmbda = 0.5
    assert trainer.lmbda == pytest.approx(0.5) and 1 <= len(generated) <= 2
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) and h["amid_kd"] == pytest.approx(h["loss"]) for h in logs)
