"""The offline demo world: gold rule, tokenizer, committed models, and the builder's quick mode."""
import json
import os
import subprocess
import sys

import pytest
import torch

import demo_gold_reward as gold
import loading
import ppo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT = os.path.join(ROOT, "data/models/demo-sft")
RM = os.path.join(ROOT, "data/models/demo-rm")
P = "Write a short review of the headphones."


def test_gold_rule_prefers_honest_good_replies():
    good = "The headphones are great and comfortable. I would recommend them to a runner."
    g = lambda r: gold.score([P], [r])[0]  # noqa: E731
    assert g(good) > 2.0
    # repetition lowers the score, more repetition lowers it more
    once = "The headphones are great and comfortable."
    assert g("The headphones are great great and comfortable.") < g(once)
    assert g("The headphones are great great great and comfortable.") < g("The headphones are great great and comfortable.")
    assert g(good + " " + good) < g(good) - 2
    # a reply cut off mid-sentence scores lower than the finished one
    assert g("The headphones are great and comfortable. I would recommend them to") < g(good) - 1
    # off-topic and negative replies score lower; empty and too-short replies are non-answers
    assert g("The kettle is great and comfortable. I would recommend it to a runner.") < g(good) - 1.5
    assert g("The headphones feel flimsy and noisy. I would not buy them again.") < 0
    assert g("") == g("Great.") == -2.0
    with pytest.raises(ValueError):
        gold.score([P, P], [good])


def test_gold_rule_reads_the_product_from_chat_prompts():
    chat = "<|user|>\nShare your thoughts about this item.\na hiking boots for a runner\n<|assistant|>\n"
    assert gold.find_items(chat) == ["hiking boots"]
    assert gold.score([chat], ["The hiking boots are sturdy and comfortable."])[0] > 1.5


def test_committed_data_is_prompt_only_alpaca_and_disjoint():
    train = json.load(open(os.path.join(ROOT, "data/ppo_prompts.json")))
    ev = json.load(open(os.path.join(ROOT, "data/ppo_eval.json")))
    assert len(train) >= 1000 and len(ev) >= 100
    assert all(set(r) == {"instruction", "input", "output"} for r in train + ev)
    key = lambda r: (r["instruction"], r["input"])  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in ev}


def test_tokenizer_round_trip_and_special_tokens():
    tok, notes = loading.load_tokenizer(SFT, "ACTOR_MODEL")
    assert notes == []  # pad and EOS are distinct already
    assert tok.pad_token_id != tok.eos_token_id
    text = "The coffee maker is great! I'd buy it again, 100%."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    prompt = loading.format_prompt(tok, "Review the lamp.")
    assert prompt == "<|user|>\nReview the lamp.\n<|assistant|>\n"
    ids = tok(prompt + "Nice.<|eos|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|user|>") and ids[-1] == tok.eos_token_id


@pytest.fixture(scope="module")
def rm_scorer():
    tok, _ = loading.load_tokenizer(RM, "REWARD_MODEL")
    model = loading.freeze(loading.load_model("score", RM, "REWARD_MODEL", torch.device("cpu"), torch.float32))
    return loading.RewardScorer(model, tok, tok, torch.device("cpu")), tok


def rm_scores(scorer, tok, prompt, replies, ended=None):
    ended = ended or [True] * len(replies)
    rows = [scorer.rm_ids(prompt, r, e) for r, e in zip(replies, ended)]
    ids, mask = loading.left_pad(rows, tok.pad_token_id, torch.device("cpu"))
    return scorer.model(ids, mask, loading.last_index(mask)).tolist()


def test_committed_reward_model_ranks_hand_written_pairs(rm_scorer):
    scorer, tok = rm_scorer
    pairs = [  # (chosen, rejected, rejected ended with EOS)
        ("The headphones are great and comfortable.", "The headphones feel flimsy and noisy.", True),
        ("The headphones are great and comfortable.", "The headphones are great great great great.", True),
        ("The headphones are lovely. I would recommend it to a nurse.", "The headphones are lovely. I would", False),
        ("I really like the design of the headphones.", "", True),
        ("The headphones are sturdy and reliable.", "The teapot is sturdy and reliable.", True),
    ]
    for chosen, rejected, ended in pairs:
        c, r = rm_scores(scorer, tok, P, [chosen, rejected], [True, ended])
        assert c > r, (chosen, rejected, c, r)


def test_committed_sft_model_ends_replies_with_eos():
    tok, _ = loading.load_tokenizer(SFT, "ACTOR_MODEL")
    model = loading.load_model("causal", SFT, "ACTOR_MODEL", torch.device("cpu"), torch.float32)
    prompts = [r for r in json.load(open(os.path.join(ROOT, "data/ppo_eval.json")))[:64]]
    rows = [tok(loading.format_prompt(tok, loading.user_text(r)), add_special_tokens=False)["input_ids"] for r in prompts]
    q, m = loading.left_pad(rows, tok.pad_token_id, torch.device("cpu"))
    torch.manual_seed(0)
    resp, _ = ppo.sample_responses(model, q, m, 48, 1.0, tok.eos_token_id, tok.pad_token_id)
    assert (resp == tok.eos_token_id).any(1).float().mean().item() >= 0.9


def test_builder_quick_mode_makes_models_that_load_and_generate(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "code/build_demo.py"), "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.load(open(out / "models/build_report.json"))
    assert report["rm"]["params"] > 0 and 0 <= report["sft_samples"]["eos_rate"] <= 1
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    lm = AutoModelForCausalLM.from_pretrained(out / "models/demo-sft")
    rm = AutoModelForSequenceClassification.from_pretrained(out / "models/demo-rm")
    assert rm.config.num_labels == 1
    tok, _ = loading.load_tokenizer(str(out / "models/demo-sft"), "ACTOR_MODEL")
    q, m = loading.left_pad([tok(loading.format_prompt(tok, "Review the lamp."))["input_ids"]], tok.pad_token_id,
                        torch.device("cpu"))
    resp, _ = ppo.sample_responses(lm.eval(), q, m, 8, 1.0, tok.eos_token_id, tok.pad_token_id)
    assert resp.shape[0] == 1 and 1 <= resp.shape[1] <= 8
    # the data is deterministic under the seed: a second build writes the same bytes
    out2 = tmp_path / "demo2"
    subprocess.run([sys.executable, os.path.join(ROOT, "code/build_demo.py"), "--quick", "--out", str(out2)],
                   capture_output=True, text=True, timeout=300, check=True)
    for name in ("ppo_prompts.json", "ppo_eval.json", "demo/pairs.json"):
        assert (out / name).read_bytes() == (out2 / name).read_bytes()
