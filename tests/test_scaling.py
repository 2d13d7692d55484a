"""Real-model paths without a hub: a Llama-architecture actor with its own tokenizer and chat template beside the
GPT-2 demo reward model (another tokenizer), and several processes under torchrun (DDP and FSDP2, gloo on CPU)."""
import csv
import json
import os

import pytest
import torch

import loading
import plumbing
import ppo

from conftest import SFT, RM, ROOT, assert_same_rows, make_config, torchrun

CPU = torch.device("cpu")
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
            "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def llama_actor(tmp_path_factory):
    """A tiny random Llama (rotary positions) with a byte-level BPE tokenizer of its own and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    texts = [r["instruction"] + " " + r["output"] for r in json.load(open(os.path.join(ROOT, "data/ppo_prompts.json")))]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=500, special_tokens=["<pad>", "</s>", "[INST]", "[/INST]"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                  additional_special_tokens=["[INST]", "[/INST]"])
    tok.chat_template = TEMPLATE
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                         bos_token_id=tok.eos_token_id))
    out = tmp_path_factory.mktemp("llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_chat_templates_and_retokenised_reward_equal_direct_scoring(llama_actor):
    tok, _ = loading.load_tokenizer(llama_actor, "ACTOR_MODEL")
    rm_tok, _ = loading.load_tokenizer(RM, "REWARD_MODEL")
    prompts = loading.load_prompts(os.path.join(ROOT, "data/ppo_eval.json"), tok, 128, "EVAL_FILE")[:4]
    assert prompts[0][1].startswith("[INST] ") and prompts[0][1].endswith(" [/INST]")  # the actor's own template
    rm = loading.freeze(loading.load_model("score", RM, "REWARD_MODEL", CPU, torch.float32))
    scorer = loading.RewardScorer(rm, rm_tok, tok, CPU)
    assert not scorer.same_tokenizer
    replies = ["The lamp is great and sturdy.", "It broke after a week.", "I really like the design.", "The kettle"]
    ended = [True, True, True, False]
    rows = [p[2] for p in prompts]
    resp = [tok(r, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if e else []) for r, e in zip(replies, ended)]
    q, qm = loading.left_pad(rows, tok.pad_token_id, CPU)
    width = max(map(len, resp))
    r_ids = torch.full((4, width), tok.pad_token_id)
    for i, r in enumerate(resp):
        r_ids[i, :len(r)] = torch.tensor(r)
    r_mask = r_ids != tok.pad_token_id
    qr, am = torch.cat([q, r_ids], 1), torch.cat([qm, r_mask], 1)
    decoded = [tok.decode(r[m].tolist(), skip_special_tokens=True) for r, m in zip(r_ids, r_mask)]
    assert decoded == replies
    got = scorer(qr, am, q.shape[1], prompts, decoded, ended)
    # the same conversations written out in the RM's own template and tokenised directly by the RM's tokenizer
    for i, (p, reply, e) in enumerate(zip(prompts, replies, ended)):
        text = f"<|user|>\n{p[0]}\n<|assistant|>\n{reply}" + ("<|eos|>" if e else "")
        assert rm_tok.decode(scorer.rm_ids(p[0], reply, e)) == text
        ids = torch.tensor([rm_tok(text, add_special_tokens=False)["input_ids"]])
        direct = rm(ids, torch.ones_like(ids, dtype=torch.bool), torch.tensor([ids.shape[1] - 1]))
        assert got[i].item() == pytest.approx(direct.item(), abs=1e-5)


def test_two_ppo_steps_with_llama_actor_and_foreign_reward_model(llama_actor, tmp_path):
    c = make_config(tmp_path, ACTOR_MODEL=llama_actor, EVAL_SIZE=4, GOLD_REWARD="", TOTAL_STEPS=2, PPO_EPOCHS=1,
                    MAX_NEW_TOKENS=8)
    s = ppo.train(c)
    assert s["steps"] == 2 and s["models"]["reward_same_tokenizer"] is False
    assert s["models"]["critic"] == llama_actor and any("zero-initialised value head" in n for n in s["notes"])
    rows = list(csv.DictReader(open(tmp_path / "ppo_metrics/training_metrics.csv")))
    assert len(rows) == 2 and all(float(r["val/mean_value"]) == float(r["val/mean_value"]) for r in rows)
    # an explicit critic with another tokenizer is refused
    with pytest.raises(loading.ConfigError, match="different tokenizer"):
        ppo.train(dict(c, CRITIC_MODEL=RM))


def test_torchrun_ddp_keeps_ranks_identical_and_writes_one_set_of_outputs(tmp_path):
    r = torchrun([], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "ppo_metrics/training_metrics.csv")))
    assert [int(x["step"]) for x in rows] == [1, 2] and int(rows[-1]["episodes"]) == 8
    assert all(float(x["dist/ranks_in_sync"]) == 1.0 for x in rows)  # actor, critic and β equal on both ranks
    s = json.load(open(tmp_path / "ppo_metrics/summary.json"))
    assert s["derived"]["world_size"] == 2 and s["eval_before"]["kl"] == pytest.approx(0, abs=1e-5)
    assert r.stdout.count("eval before:") == 1  # only rank 0 prints
    assert sorted(os.listdir(tmp_path / "ppo_metrics")) == ["config.json", "samples.jsonl", "summary.json",
                                                            "training_curves.png", "training_metrics.csv",
                                                            "worked_example.md"]
    # one lock for the job (rank 0's: had rank 1 tried to take it, it would have refused), given back at the end
    assert "is in use by another run" not in r.stderr and not (tmp_path / plumbing.LOCK_FILE).exists()
    # a global batch that does not share out over the processes is a clear error
    bad = torchrun(["--grad_accum=1"], tmp_path / "bad")
    assert bad.returncode != 0 and "does not divide by the 2 processes" in bad.stderr


def test_torchrun_fsdp2_trains_and_saves_full_models(tmp_path):
    r = torchrun(["--distributed=fsdp"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "ppo_metrics/training_metrics.csv")))
    assert len(rows) == 2 and all(float(x["dist/ranks_in_sync"]) == 1.0 for x in rows)
    assert all(0.5 < float(x["val/ratio"]) < 2 for x in rows)
    from transformers import AutoModelForCausalLM
    actor = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo_model/actor")
    ref = AutoModelForCausalLM.from_pretrained(os.path.join(ROOT, "data/models/demo-sft"))
    moved = [not torch.equal(a, b) for a, b in zip(actor.parameters(), ref.parameters())]
    assert any(moved)  # the gathered weights are the trained ones


def test_bf16_compute_with_gradient_checkpointing(tmp_path):
    """DTYPE=bfloat16 (autocast over fp32 master weights; frozen models stored in bf16) and gradient checkpointing
    (train mode in the update; dropout is off, so the first ratio is still 1)."""
    c = make_config(tmp_path, EVAL_FILE="", GOLD_REWARD="", TOTAL_STEPS=2, PPO_BUFFER_SIZE=2, PPO_EPOCHS=1,
                    MAX_NEW_TOKENS=8, DTYPE="bfloat16", GRADIENT_CHECKPOINTING=True, OFFLOAD_FROZEN=True)
    s = ppo.train(c)
    assert s["derived"]["dtype"] == "bfloat16" and s["steps"] == 2
    rows = list(csv.DictReader(open(tmp_path / "ppo_metrics/training_metrics.csv")))
    assert all(abs(float(r["objective/kl"])) < 1.0 for r in rows)  # bf16 reference vs autocast actor: close, not equal
    roles = loading.load_roles(c, CPU, torch.bfloat16)
    assert next(roles.actor.parameters()).dtype == torch.float32 and next(roles.ref.parameters()).dtype == torch.bfloat16
    assert roles.actor.is_activation_checkpointing


def test_bf16_on_the_cpu_runs_the_trained_models_attention_in_fp32(tmp_path):
    """Under bf16 on a CPU the actor's and critic's attention runs in fp32 (loading.attention_in_fp32: faster there),
    with the same causal and padding mask as SDPA: logits within bf16 rounding of an fp32 forward (a custom attention
    without its mask function attended to every token: 6.6 off), and the saved config keeps its own implementation."""
    roles = loading.load_roles(make_config(DTYPE="bfloat16"), CPU, torch.bfloat16)
    assert roles.actor.config._attn_implementation == roles.critic.model.config._attn_implementation == "sdpa_fp32"
    fp32 = loading.load_model("causal", SFT, "ACTOR_MODEL", CPU, torch.float32)
    ids, mask = loading.left_pad([[5, 9, 14, 3, 7, 2, 8], [11, 4, 6]], 0, CPU)
    kw = dict(attention_mask=mask.long(), position_ids=loading.position_ids_of(mask))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = roles.actor(ids, **kw).logits.float()
    assert (logits - fp32(ids, **kw).logits)[mask].abs().max() < 0.2
    roles.actor.save_pretrained(tmp_path)
    assert "sdpa_fp32" not in (tmp_path / "config.json").read_text()


def update_stats(dtype, monkeypatch):
    """Every micro-batch's statistics of one PPO step (ppo_step, as the run calls it) in `dtype`: 3 epochs over one
    minibatch of 8 replies, so the forwards of epochs 2 and 3 follow an optimizer step."""
    c = make_config(EVAL_FILE="", GOLD_REWARD="", MINI_BATCH_SIZE=8, PPO_BUFFER_SIZE=1, PPO_EPOCHS=3,
                    MAX_NEW_TOKENS=8, LEARNING_RATE=1e-3, ENTROPY_COEF=0.0)
    roles = loading.load_roles(c, CPU, dtype)
    params = loading.trainable_parameters([roles.actor, roles.critic])
    trainer = ppo.Trainer(roles.actor, roles.critic, params, torch.optim.AdamW(params, lr=1e-3), None)
    prompts = loading.load_prompts(c["PROMPT_FILE"], roles.tok, 128, "PROMPT_FILE")[:8]
    seen, update = [], ppo.ppo_update
    with monkeypatch.context() as m:
        m.setattr(ppo, "ppo_update", lambda *a, **k: seen.extend(update(*a, **k)) or seen)
        torch.manual_seed(0)
        ppo.ppo_step(roles, trainer, prompts, 0.1, c, ppo.batch_sizes(c, 1))
    return seen


def test_bf16_update_reads_the_weights_of_each_optimizer_step(monkeypatch):
    """Under bf16 autocast the update's forwards after an optimizer step see the new weights, as in fp32: autocast
    caches each weight's bf16 copy for its region, so a region spanning the update read the copies of before its
    first step (the ratio of epoch 2 then moved ~150x less than fp32's; only norms and embeddings showed through)."""
    fp32, bf16 = update_stats(torch.float32, monkeypatch), update_stats(torch.bfloat16, monkeypatch)
    assert bf16[0]["policy/approxkl_avg"] < 1e-3  # before any step: the sampler's policy, up to bf16 rounding
    for a, b in zip(fp32[1:], bf16[1:]):
        assert a["policy/approxkl_avg"] > 0.05
        assert b["policy/approxkl_avg"] == pytest.approx(a["policy/approxkl_avg"], rel=0.25)
        assert b["val/ratio"] == pytest.approx(a["val/ratio"], abs=0.01)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_resume_is_exact(mode, tmp_path):
    """4 steps in one go equal 2 steps + 2 resumed, with 2 processes (every rank's RNG and, under FSDP, the
    gathered-then-resharded weights and optimizer state come back)."""
    args = [f"--distributed={mode}", "--eval_every=0", "--save_model=false"]
    for out, extra in ((tmp_path / "a", ["--total_steps=4"]), (tmp_path / "b", [])):  # b: --total_steps=2
        r = torchrun(args + extra, out)
        assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(args + ["--total_steps=4"], tmp_path / "b")
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stderr[-2000:]
    a = list(csv.DictReader(open(tmp_path / "a/ppo_metrics/training_metrics.csv")))
    b = list(csv.DictReader(open(tmp_path / "b/ppo_metrics/training_metrics.csv")))
    assert len(a) == len(b) == 4
    assert_same_rows(a, b)
