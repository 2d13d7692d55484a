"""Checkpoints as users bring them: tiny random models in the shapes of Llama-3, Mistral, Gemma 3 and OPT with their
tokenizer quirks (no pad, pad == EOS, several stop ids, chat templates, a base model, learned positions), an encoder
reward model, and what a user does with the saved models afterwards."""
import pytest
import torch

import loading
import ppo

from conftest import SFT, make_config

CPU = torch.device("cpu")


def config(out, **kw):
    return make_config(out, **dict(dict(EVAL_SIZE=4, GOLD_REWARD="", TOTAL_STEPS=2, MINI_BATCH_SIZE=2, PPO_EPOCHS=1,
                                        MAX_NEW_TOKENS=8, SAVE_EVERY=0, SAVE_MODEL=True), **kw))


def assert_saved_models_work(out, stop_ids):
    """What a user does next with OUTPUT_DIR/ppo_model: the actor and its saved tokenizer generate for a left-padded
    batch, stopping where the run stopped; the critic loads and scores the same padded batch."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    actor_dir, critic_dir = out / "ppo_model/actor", out / "ppo_model/critic"
    tok = AutoTokenizer.from_pretrained(actor_dir, padding_side="left")
    actor = AutoModelForCausalLM.from_pretrained(actor_dir)
    assert max(tok.get_vocab().values()) < actor.get_input_embeddings().num_embeddings  # no id past the table
    batch = tok(["Review the lamp.", "What do you think of the kettle you bought last week? Be honest."],
                padding=True, return_tensors="pt")
    assert batch["attention_mask"][0, 0] == 0  # the short prompt really is left-padded
    ids = actor.generate(**batch, max_new_tokens=4, do_sample=False)
    assert ids.shape[0] == 2 and batch["input_ids"].shape[1] < ids.shape[1] <= batch["input_ids"].shape[1] + 4
    eos = actor.generation_config.eos_token_id
    assert sorted(eos if isinstance(eos, list) else [eos]) == stop_ids
    critic = AutoModelForSequenceClassification.from_pretrained(critic_dir)
    assert critic.config.num_labels == 1 and critic(**batch).logits.shape == (2, 1)


@pytest.mark.parametrize("family,stops", [("llama3", ["<|end_of_text|>", "<|eot_id|>"]), ("mistral", ["</s>"]),
                                          ("gemma3", ["<eos>", "<end_of_turn>"])])
def test_chat_model_families_train_and_save_models_that_work(family, stops, tiny_checkpoint, tmp_path):
    path = tiny_checkpoint(family)
    s = ppo.train(config(tmp_path, ACTOR_MODEL=path))
    assert s["status"] == "finished" and s["steps"] == 2 and s["eval_before"]["kl"] == pytest.approx(0, abs=1e-5)
    assert sorted(s["models"]["stop_tokens"]) == sorted(stops)  # generation_config's EOS ids with the tokenizer's
    assert_saved_models_work(tmp_path, sorted(s["models"]["stop_tokens"].values()))
    if family == "llama3":  # no pad token: the saved tokenizer pads with its EOS, and adds no token
        from transformers import AutoTokenizer
        saved = AutoTokenizer.from_pretrained(tmp_path / "ppo_model/actor")
        assert saved.pad_token == "<|end_of_text|>" and len(saved) == len(AutoTokenizer.from_pretrained(path))
        assert any("no pad token" in n for n in s["notes"])
        # a new run starts from the saved actor
        again = ppo.train(config(tmp_path / "again", ACTOR_MODEL=str(tmp_path / "ppo_model/actor"), TOTAL_STEPS=1,
                                 EVAL_FILE="", SAVE_MODEL=False))
        assert again["steps"] == 1 and sorted(again["models"]["stop_tokens"]) == sorted(stops)


def test_base_model_with_learned_positions_and_an_encoder_reward_model(tiny_checkpoint, tmp_path, capsys):
    opt, rm = tiny_checkpoint("opt"), tiny_checkpoint("distilbert-rm")
    s = ppo.train(config(tmp_path, ACTOR_MODEL=opt, REWARD_MODEL=rm, REWARD_LABEL="POSITIVE", MAX_NEW_TOKENS=40))
    out = capsys.readouterr().out
    # OPT has 64 learned positions: prompts over 64 - 40 tokens are dropped by that budget, and it is said
    assert "prompts longer than 24 tokens (64 positions of ACTOR_MODEL - MAX_NEW_TOKENS = 40)" in out
    m = s["models"]
    assert s["steps"] == 2 and m["reward_own_pooling"] and not m["reward_same_tokenizer"] and m["critic"] == opt
    assert any("encoder classifier" in n and "zero-initialised value head" in n for n in s["notes"])
    assert_saved_models_work(tmp_path, [m["stop_tokens"]["</s>"]])
    # and a budget with no room at all is one clear error naming both numbers
    with pytest.raises(loading.ConfigError, match="MAX_NEW_TOKENS = 64 leaves no room for a prompt in the 64 positions"):
        ppo.train(config(tmp_path / "x", ACTOR_MODEL=opt, MAX_NEW_TOKENS=64))


def test_encoder_reward_model_scores_through_its_own_tokenizer_and_pooling(tiny_checkpoint):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    path = tiny_checkpoint("distilbert-rm")
    rm_tok, _ = loading.load_tokenizer(path, "REWARD_MODEL")
    actor_tok, _ = loading.load_tokenizer(SFT, "ACTOR_MODEL")
    scorer = loading.RewardScorer(loading.freeze(loading.load_model("reward", path, "REWARD_MODEL", CPU, torch.float32,
                                                        label="POSITIVE")), rm_tok, actor_tok, CPU)
    users = ["Review the lamp.", "What do you think of the kettle you bought last week?"]
    replies = ["It is great.", "It broke after a week and the lid is loose."]
    got = scorer(None, None, None, [loading.Prompt(u, None, None) for u in users], replies, [True, False])
    # the same pairs through plain transformers, one at a time (no padding): the POSITIVE logit
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path).eval()
    for i, (u, r) in enumerate(zip(users, replies)):
        enc = tok(u, r, return_tensors="pt")
        enc.pop("token_type_ids", None)  # DistilBERT takes no segment ids
        assert got[i].item() == pytest.approx(model(**enc).logits[0, 1].item(), abs=1e-5)


def test_a_classifier_with_several_outputs_needs_the_label_named(tiny_checkpoint):
    path = tiny_checkpoint("distilbert-rm")
    load = lambda role="REWARD_MODEL", kind="reward", **kw: loading.load_model(kind, path, role, CPU, torch.float32, **kw)  # noqa
    with pytest.raises(loading.ConfigError, match=r"has 2 outputs \(NEGATIVE, POSITIVE\).*--reward_label"):
        load()
    with pytest.raises(loading.ConfigError, match="REWARD_LABEL 'happy' is not an output.*1 = POSITIVE"):
        load(label="happy")
    assert load(label="1").index == 1 and load(label="NEGATIVE").index == 0
    with pytest.raises(loading.ConfigError, match="no `score` head"):  # an encoder gives no value per token
        load("CRITIC_MODEL", "score")


def test_stop_tokens_come_from_generation_config_and_the_tokenizer(tiny_checkpoint):
    path = tiny_checkpoint("llama3")
    tok, _ = loading.load_tokenizer(path, "ACTOR_MODEL")
    actor = loading.load_model("causal", path, "ACTOR_MODEL", CPU, torch.float32)
    eos, eot = tok.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"])
    assert loading.stop_token_ids(tok, actor, "") == sorted([eos, eot])
    assert loading.stop_token_ids(tok, actor, "<|eot_id|>, 7") == sorted([eot, 7])  # STOP_TOKENS replaces them
    for bad in ("<|nope|>", "99999"):
        with pytest.raises(loading.ConfigError, match="not one token of the actor's tokenizer"):
            loading.stop_token_ids(tok, actor, bad)
