"""Build the offline demo world that `python code/ppo.py` runs on by default.

    python code/build_demo.py            # ~5 min on 2 CPU cores; rewrites data/ and data/models/
    python code/build_demo.py --quick --out /tmp/demo   # seconds; tiny models, for tests

What it writes (deterministic under --seed; the JSON data byte for byte, the models up to float noise):
  data/ppo_prompts.json, data/ppo_eval.json   prompt-only Alpaca records (train / held-out, disjoint prompts)
  data/demo/sft.json, data/demo/pairs.json    the SFT set and the RM's preference pairs (chosen, rejected)
  data/models/demo-sft/                       GPT-2-architecture causal LM, trained from scratch by SFT
  data/models/demo-rm/                        sequence-classification reward model (num_labels 1), Bradley-Terry
  data/models/build_report.json               sizes, times, SFT held-out loss, RM accuracy, SFT sample quality

The world: prompts ask for a short review or recommendation of one of 30 products. A hidden gold rule
(data/demo_gold_reward.py) prefers replies that name the product, are positive, end properly and do not repeat
themselves. The SFT corpus mixes good, neutral, negative and off-topic replies, so the SFT policy is mediocre
and PPO has room to improve. The RM learns the gold rule from pairs the rule labels, including the hard negatives
that a reward-hacking policy would otherwise find: repetition, replies cut off without EOS, empty and too-short
replies, off-topic replies (also the same reply with the product swapped for another).
"""
import argparse
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "data"))
sys.path.insert(0, os.path.join(ROOT, "code"))
import demo_gold_reward as gold  # noqa: E402  (the gold rule lives with the data it defines)
import loading  # noqa: E402  (the same prompt format, padding and sampler as the trainer)
import ppo  # noqa: E402

PAD, EOS, USER, ASSISTANT = "<|pad|>", "<|eos|>", "<|user|>", "<|assistant|>"
# The one prompt format of the demo: what ppo.py gets from tokenizer.apply_chat_template(add_generation_prompt=True).
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}" + USER + "\n{{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}" + ASSISTANT + "\n{{ m['content'] }}" + EOS + "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "\n{% endif %}"
)

# ---- the synthetic task ------------------------------------------------------------------------------------
PERSONS = ["student", "runner", "traveler", "parent", "teacher", "cook", "gamer", "writer", "nurse", "friend",
           "child", "musician", "painter", "driver", "farmer", "doctor", "baker", "hiker", "designer", "neighbor"]
ASPECTS = ["price", "design", "size", "color", "quality", "weight", "comfort", "finish", "material", "shape",
           "packaging", "style"]
TIMES = ["week", "month", "year", "summer", "winter"]
POS_ADJ = ["great", "excellent", "comfortable", "reliable", "sturdy", "lovely", "useful", "beautiful", "solid",
           "wonderful", "perfect", "fantastic"]
NEG_ADJ = ["flimsy", "noisy", "awkward", "disappointing", "cheap", "fragile", "dull", "bad", "poor", "annoying"]
INSTRUCTIONS = [  # (instruction, input); {item} {person} {aspect} {time} are filled in
    ("Write a short review of the {item}.", ""),
    ("Write a short review of this product.", "{item}"),
    ("Recommend a {item} for a {person}.", ""),
    ("What do you think of the {item}?", ""),
    ("Describe the {item} you bought last {time}.", ""),
    ("Tell a friend about the {item}.", "Mention the {aspect}."),
    ("Give your opinion on the {item} for a {person}.", ""),
    ("Review the {item} in two sentences.", "Focus on the {aspect}."),
    ("Would you buy the {item} again?", ""),
    ("Share your thoughts about this item.", "a {item} for a {person}"),
]
POSITIVE_SENTENCES = ["The {item} is {pa} and {pa2}.", "I really like the {aspect}.",
                      "I would recommend it to a {person}.",
                      "It works well every day.", "The {aspect} is {pa}.", "I love how {pa} it feels.",
                      "It is a {pa} choice for a {person}.", "I am happy with it."]
NEUTRAL_SENTENCES = ["It arrived last {time}.", "The {item} comes in a box.", "I use it every {time}.",
                     "It is about the size I expected.", "The {aspect} is as described."]
NEGATIVE_SENTENCES = ["The {item} feels {na}.", "The {aspect} is {na}.", "It broke after a {time}.",
                      "I would not buy it again.", "It is too {na} for a {person}."]


def fill(template, rng, item):
    pa, pa2 = rng.sample(POS_ADJ, 2)
    return template.format(item=item, person=rng.choice(PERSONS), aspect=rng.choice(ASPECTS), time=rng.choice(TIMES),
                           pa=pa, pa2=pa2, na=rng.choice(NEG_ADJ))


def make_reply(rng, item, mood):
    """A reply of 1-3 sentences in one of the corpus moods: good, mixed, neutral, negative, off-topic."""
    other = rng.choice([i for i in gold.ITEMS if i != item])
    if mood == "good":
        bank = [(POSITIVE_SENTENCES, item)] * 3
    elif mood == "mixed":
        bank = [(POSITIVE_SENTENCES, item), (NEGATIVE_SENTENCES, item), (NEUTRAL_SENTENCES, item)]
    elif mood == "neutral":
        bank = [(NEUTRAL_SENTENCES, item)] * 3
    elif mood == "negative":
        bank = [(NEGATIVE_SENTENCES, item), (NEGATIVE_SENTENCES, item), (NEUTRAL_SENTENCES, item)]
    else:  # off-topic: talks about another product
        bank = [(POSITIVE_SENTENCES, other), (NEUTRAL_SENTENCES, other), (NEGATIVE_SENTENCES, other)]
    n = rng.randint(1, 3)
    sentences, first = [], "The {item} is {pa} and {pa2}." if mood == "good" else "The {item} feels {na}."
    if mood in ("good", "negative") and rng.random() < 0.5:
        sentences.append(fill(first, rng, item))
    while len(sentences) < n:
        templates, it = rng.choice(bank)
        s = fill(rng.choice(templates), rng, it)
        if s not in sentences:
            sentences.append(s)
    return " ".join(sentences)


def make_prompt(rng):
    item = rng.choice(gold.ITEMS)
    instruction, inp = rng.choice(INSTRUCTIONS)
    return {"instruction": fill(instruction, rng, item), "input": fill(inp, rng, item)}, item


SFT_MOODS = (["good"] * 30 + ["mixed"] * 25 + ["neutral"] * 15 + ["negative"] * 18 + ["off"] * 12)


def make_records(rng, n, seen, distinct=True):
    """n Alpaca records whose prompts are not in `seen`; with `distinct`, no prompt twice (`seen` is updated).
    output = a corpus-style reference reply."""
    out = []
    while len(out) < n:
        rec, item = make_prompt(rng)
        key = (rec["instruction"], rec["input"])
        if key in seen:
            continue
        if distinct:
            seen.add(key)
        rec["output"] = make_reply(rng, item, rng.choice(SFT_MOODS))
        out.append(rec)
    return out


def hard_negative(rng, reply, item):
    """A worse version of `reply` of the kinds a reward hacker finds. Returns (text, ends_with_eos)."""
    words = reply.split()
    kind = rng.choice(["repeat_word", "repeat_sentence", "cut", "cut", "empty", "short", "offtopic", "swap", "swap",
                       "negative"])
    if kind == "repeat_word":
        w = rng.choice(POS_ADJ + [item.split()[-1]])
        k = rng.randint(1, len(words))
        return " ".join(words[:k] + [w] * rng.randint(2, 6) + words[k:]), True
    if kind == "repeat_sentence":
        return " ".join([reply] * 2), True
    if kind == "cut":  # stopped mid-sentence at the length limit: no final period and no EOS
        k = rng.randint(1, max(1, len(words) - 1))
        return " ".join(words[:k]).rstrip(".!"), False
    if kind == "empty":
        return "", True
    if kind == "short":
        return rng.choice(["Good.", "It is great.", "Yes.", "Nice one.", "Great great.", "The " + item + "."]), True
    if kind == "swap" and item in reply:  # the same good reply about another product: topic is what differs
        return reply.replace(item, rng.choice([i for i in gold.ITEMS if i != item])), True
    if kind in ("offtopic", "swap"):
        return make_reply(rng, item, "off"), True
    return make_reply(rng, item, "negative"), True


def make_pairs(rng, records, n_pairs):
    """Preference pairs labelled by the gold rule: (prompt, chosen, rejected, rejected_has_eos)."""
    items = [gold.find_items(loading.user_text(r))[0] for r in records]
    pairs = []
    with tqdm(total=n_pairs, desc="pairs", leave=False) as bar:
        while len(pairs) < n_pairs:
            i = rng.randrange(len(records))
            rec, item = records[i], items[i]
            a = make_reply(rng, item, rng.choice(["good", "good", "mixed", "neutral"]))
            if rng.random() < 0.5:
                b, b_eos = hard_negative(rng, a if rng.random() < 0.7 else make_reply(rng, item, "good"), item)
            else:
                b, b_eos = make_reply(rng, item, rng.choice(SFT_MOODS)), True
            ga, gb = gold.score([loading.user_text(rec)] * 2, [a, b])
            gb = gb if b_eos else min(gb, -1.0)  # a cut-off reply is never better than a finished one
            if abs(ga - gb) < 0.5:
                continue
            chosen, rejected, rej_eos = (a, b, b_eos) if ga > gb else (b, a, True)
            pairs.append({"prompt": loading.user_text(rec), "chosen": chosen, "rejected": rejected,
                          "rejected_eos": rej_eos})
            bar.update()
    return pairs


# ---- tokenizer and models -----------------------------------------------------------------------------------
def train_tokenizer(texts, vocab_size, out_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS, USER, ASSISTANT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=PAD, eos_token=EOS,
                                  additional_special_tokens=[USER, ASSISTANT], padding_side="left",
                                  model_max_length=256)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out_dir)
    return tok


def encode_pair(tok, prompt, reply, with_eos=True):
    """Token ids of the templated prompt and of the reply (+EOS); the layout ppo.py generates and scores."""
    p_ids = tok(loading.format_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
    r_ids = tok(reply, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if with_eos else [])
    return p_ids, r_ids


def left_pad(rows):
    """ppo.py's left padding as model inputs: (ids, attention_mask, position_ids); positions count real tokens only.
    The mask as 0/1 integers, as the models were trained with (the same numbers as a boolean mask, up to rounding)."""
    ids, mask = loading.left_pad(rows, loading.PAD_ID, torch.device("cpu"))
    return loading.model_inputs(ids, mask), mask.long(), loading.position_ids_of(mask)


def gpt2_config(tok, size, num_labels=None):
    from transformers import GPT2Config
    cfg = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=size["n_embd"], n_layer=size["n_layer"],
                     n_head=size["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if num_labels:
        cfg.num_labels = num_labels
    return cfg


def lr_at(step, total, lr):
    warm = max(1, total // 20)
    return lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))


def train_sft(tok, records, heldout, size, steps, batch, lr, seed):
    from transformers import GPT2LMHeadModel
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(gpt2_config(tok, size))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

    def batch_of(recs):
        rows, labels = [], []
        for r in recs:
            p, a = encode_pair(tok, loading.user_text(r), r["output"])
            rows.append(p + a)
            labels.append([-100] * len(p) + a)  # loss on the reply and its EOS only
        ids, mask, pos = left_pad(rows)
        lab = torch.full_like(ids, -100)
        for i, lb in enumerate(labels):
            lab[i, ids.shape[1] - len(lb):] = torch.tensor(lb)
        return ids, mask, pos, lab

    def loss_of(recs):
        ids, mask, pos, lab = batch_of(recs)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1), ignore_index=-100)

    rng = random.Random(seed)
    model.train()
    for step in (bar := tqdm(range(steps), desc="SFT", leave=False)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        loss = loss_of(rng.sample(records, batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        held = [loss_of(heldout[i:i + 64]).item() for i in range(0, len(heldout), 64)]
    return model, sum(held) / len(held)


def train_rm(tok, pairs, heldout, sft_dir, steps, batch, lr, seed):
    """Bradley-Terry reward model initialised from the SFT model (InstructGPT's recipe): the SFT backbone already
    links a reply to the product its prompt names, which a from-scratch RM of this size learns poorly."""
    from transformers import GPT2ForSequenceClassification
    torch.manual_seed(seed)
    model = GPT2ForSequenceClassification.from_pretrained(sft_dir, num_labels=1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

    def rewards(prs):
        """Scores of chosen and rejected, read at each row's last real token (left padding: the last column)."""
        rows = []
        for p in prs:
            pc, c = encode_pair(tok, p["prompt"], p["chosen"])
            pr, r = encode_pair(tok, p["prompt"], p["rejected"], with_eos=p["rejected_eos"])
            rows += [pc + c, pr + r]
        ids, mask, pos = left_pad(rows)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.squeeze(-1)
        return out[0::2], out[1::2]

    rng = random.Random(seed)
    model.train()
    for step in (bar := tqdm(range(steps), desc="RM", leave=False)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        rc, rr = rewards(rng.sample(pairs, batch))
        loss = -F.logsigmoid(rc - rr).mean()  # Bradley-Terry
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{(rc > rr).float().mean().item():.2f}")
    model.eval()
    with torch.no_grad():
        correct = sum(int((rc > rr).sum()) for rc, rr in (rewards(heldout[i:i + 64])
                                                         for i in range(0, len(heldout), 64)))
    return model, correct / len(heldout)


@torch.no_grad()
def sample_replies(model, tok, prompts, max_new_tokens, temperature, seed):
    """One reply per prompt with ppo.py's own sampler (plain temperature sampling, stopping at EOS): the replies PPO
    starts from. Returns (texts, ended_with_eos)."""
    torch.manual_seed(seed)
    texts, ended, stop = [], [], [tok.eos_token_id]
    for i in range(0, len(prompts), 64):
        rows = [encode_pair(tok, p, "", with_eos=False)[0] for p in prompts[i:i + 64]]
        ids, mask = loading.left_pad(rows, loading.PAD_ID, torch.device("cpu"))
        sampled, _ = ppo.sample_responses(model, ids, mask, max_new_tokens, temperature, stop, loading.PAD_ID)
        resp, keep = ppo.truncate_after_eos(sampled, stop, loading.PAD_ID)
        texts += [tok.decode(r[k].tolist(), skip_special_tokens=True) for r, k in zip(resp, keep)]
        ended += ppo.ends_with_stop(resp, keep, stop).tolist()
    return texts, ended


def size_mb(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "data"),
                    help="folder for the data and models/ (default: data/)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few steps (tests): seconds, not minutes")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (2 = the CI machine)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    if a.quick:
        n_train, n_eval, n_sft, n_pairs, vocab = 200, 40, 400, 400, 400
        size, sft_steps, rm_steps, batch = {"n_embd": 32, "n_layer": 1, "n_head": 2}, 30, 30, 16
    else:
        n_train, n_eval, n_sft, n_pairs, vocab = 1500, 200, 8000, 16000, 1024
        size, sft_steps, rm_steps, batch = {"n_embd": 128, "n_layer": 4, "n_head": 4}, 1200, 1500, 64
    t_start = time.time()
    rng = random.Random(a.seed)
    seen = set()
    eval_records = make_records(rng, n_eval, seen)   # held-out prompts first, so train can never contain them
    train_records = make_records(rng, n_train, seen)
    sft_records = make_records(rng, n_sft, seen, distinct=False)  # SFT prompts: never a PPO prompt, may repeat
    pairs = make_pairs(rng, sft_records, n_pairs)
    data_dir, models_dir = a.out, os.path.join(a.out, "models")
    os.makedirs(os.path.join(data_dir, "demo"), exist_ok=True)
    for name, obj in [("ppo_prompts.json", train_records), ("ppo_eval.json", eval_records),
                      ("demo/sft.json", sft_records), ("demo/pairs.json", pairs)]:
        with open(os.path.join(data_dir, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False)
            f.write("\n")
    print(f"data: {len(train_records)} train prompts, {len(eval_records)} eval prompts, {len(sft_records)} SFT "
          f"records, {len(pairs)} preference pairs")

    sft_dir, rm_dir = os.path.join(models_dir, "demo-sft"), os.path.join(models_dir, "demo-rm")
    corpus = [loading.user_text(r) for r in sft_records + train_records + eval_records] \
        + [r["output"] for r in sft_records] + [p["rejected"] for p in pairs]
    t0 = time.time()
    tok = train_tokenizer(corpus, vocab, sft_dir)
    tok.save_pretrained(rm_dir)
    t_tok = time.time() - t0
    print(f"tokenizer: {len(tok)} tokens ({t_tok:.1f}s)")

    t0 = time.time()
    held_sft = sft_records[-max(64, n_sft // 20):]
    sft, sft_loss = train_sft(tok, sft_records[:-len(held_sft)], held_sft, size, sft_steps, batch, 3e-3, a.seed)
    sft.save_pretrained(sft_dir)
    t_sft = time.time() - t0
    print(f"SFT: held-out loss {sft_loss:.3f} ({t_sft:.0f}s)")

    t0 = time.time()
    held_pairs = pairs[-max(64, n_pairs // 10):]
    rm, rm_acc = train_rm(tok, pairs[:-len(held_pairs)], held_pairs, sft_dir, rm_steps, batch // 2, 1e-3, a.seed)
    t_rm = time.time() - t0
    print(f"RM: held-out pairwise accuracy {rm_acc:.3f} ({t_rm:.0f}s)")

    # Quality of what SFT writes on held-out prompts at temperature 1.0 (the PPO starting point).
    prompts = [loading.user_text(r) for r in eval_records]
    texts, ended = sample_replies(sft, tok, prompts, 48, 1.0, a.seed)
    golds = gold.score(prompts, texts)
    refs = gold.score(prompts, [r["output"] for r in eval_records])

    # Scale the RM's head so that its scores on SFT samples have std 1 (OAI's reward gain; the offset is left, as
    # GPT-2's score head has no bias): rewards of a known scale make the KL coefficient and value clip meaningful.
    with torch.no_grad():
        rows = [sum(encode_pair(tok, p, t, with_eos=e), []) for p, t, e in zip(prompts, texts, ended)]
        ids, mask, pos = left_pad(rows)
        s = rm(input_ids=ids, attention_mask=mask, position_ids=pos).logits.squeeze(-1)
        rm.score.weight.mul_(1.0 / s.std().clamp(min=1e-6))
        s = rm(input_ids=ids, attention_mask=mask, position_ids=pos).logits.squeeze(-1)
    rm.save_pretrained(rm_dir)
    gold_t = torch.tensor(golds)
    corr = float(torch.corrcoef(torch.stack([s, gold_t]))[0, 1])

    report = {
        "seed": a.seed, "quick": a.quick, "torch": torch.__version__, "threads": a.threads,
        "data": {"train_prompts": len(train_records), "eval_prompts": len(eval_records),
                 "sft_records": len(sft_records), "preference_pairs": len(pairs)},
        "tokenizer": {"vocab_size": len(tok), "pad": tok.pad_token_id, "eos": tok.eos_token_id},
        "architecture": dict(size, n_positions=256),
        "sft": {"params": sft.num_parameters(), "size_mb": round(size_mb(sft_dir), 2), "steps": sft_steps,
                "build_s": round(t_sft, 1), "heldout_loss": round(sft_loss, 4)},
        "rm": {"params": rm.num_parameters(), "size_mb": round(size_mb(rm_dir), 2), "steps": rm_steps,
               "build_s": round(t_rm, 1), "heldout_pairwise_accuracy": round(rm_acc, 4),
               "heldout_pairs": len(held_pairs), "score_mean_on_sft_samples": round(float(s.mean()), 4),
               "score_std_on_sft_samples": round(float(s.std()), 4),
               "corr_with_gold_on_sft_samples": round(corr, 4)},
        "sft_samples": {"prompts": len(prompts), "temperature": 1.0, "max_new_tokens": 48,
                        "eos_rate": round(sum(ended) / len(ended), 4), "gold_mean": round(sum(golds) / len(golds), 4),
                        "gold_best_achievable": 3.5, "reference_output_gold_mean": round(sum(refs) / len(refs), 4),
                        "examples": [{"prompt": p, "reply": t, "gold": g} for p, t, g in
                                     list(zip(prompts, texts, golds))[:5]]},
        "build_s": round(time.time() - t_start, 1),
    }
    with open(os.path.join(models_dir, "build_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: report[k] for k in ("sft", "rm")}, indent=1))
    print(f"SFT samples: EOS rate {report['sft_samples']['eos_rate']:.2f}, gold mean "
          f"{report['sft_samples']['gold_mean']:.2f} (best achievable 3.5); RM/gold correlation {corr:.2f}")
    print(f"done in {report['build_s']:.0f}s -> {models_dir}")


if __name__ == "__main__":
    main()
