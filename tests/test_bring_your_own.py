"""Users' own setups: prompt files in the formats their ecosystems use (JSON, JSONL, Parquet; Alpaca, chat, ShareGPT,
prompt), rule-based reward functions, dashboards (TensorBoard, W&B offline) and learning-rate schedules."""
import csv
import glob
import json
import math
import os
import sys

import pandas as pd
import pytest
import torch

import loading
import plumbing
import ppo

from conftest import ROOT, SFT, assert_same_rows, make_config

CPU = torch.device("cpu")
GOLD = os.path.join(ROOT, "data/demo_gold_reward.py")
SYSTEM = {"role": "system", "content": "You are a helpful shop assistant."}
USER1 = {"role": "user", "content": "I want a lamp."}
ASSISTANT1 = {"role": "assistant", "content": "Which room is it for?"}
USER2 = {"role": "user", "content": "Review the lamp for my desk."}
TRAILING = {"role": "assistant", "content": "The lamp is great."}  # a trailing assistant turn: dropped
PROMPT = [SYSTEM, USER1, ASSISTANT1, USER2]


@pytest.fixture(scope="module")
def tok():
    return loading.load_tokenizer(SFT, "ACTOR_MODEL")[0]


def sharegpt(turns):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return [{"from": names[t["role"]], "value": t["content"]} for t in turns]


@pytest.mark.parametrize("fmt", ["chat", "sharegpt", "prompt-messages"])
@pytest.mark.parametrize("ext", ["json", "jsonl", "parquet"])
def test_every_format_and_file_type_gives_the_same_prompt(fmt, ext, tok, tmp_path):
    turns = PROMPT + [TRAILING]
    record = {"chat": {"messages": turns, "id": 7}, "sharegpt": {"conversations": sharegpt(turns)},
              "prompt-messages": {"prompt": turns, "data_source": "shop"}}[fmt]
    path = str(tmp_path / f"p.{ext}")
    if ext == "json":
        json.dump([record, record], open(path, "w"))
    elif ext == "jsonl":
        open(path, "w").write((json.dumps(record) + "\n") * 2)
    else:
        pd.DataFrame([record, record]).to_parquet(path)
    said = []
    prompts = loading.load_prompts(path, tok, 128, "PROMPT_FILE", said.append)
    assert len(prompts) == 2 and prompts[0][0] == PROMPT  # system kept, the trailing assistant turn dropped
    assert prompts[0][1] == tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert "TRAILING" not in prompts[0][1] and TRAILING["content"] not in prompts[0][1]
    name = {"chat": "chat", "sharegpt": "ShareGPT", "prompt-messages": "prompt"}[fmt]
    assert any(f"2 records, format {name}" in line for line in said)


def test_alpaca_and_prompt_text_records_are_one_user_turn(tok, tmp_path):
    json.dump([{"instruction": "Review the lamp.", "input": "for my desk", "output": "never read"}],
              open(tmp_path / "a.json", "w"))
    pd.DataFrame([{"prompt": "Review the lamp.\nfor my desk"}]).to_parquet(tmp_path / "b.parquet")
    a = loading.load_prompts(str(tmp_path / "a.json"), tok, 128, "PROMPT_FILE", lambda *x: None)
    b = loading.load_prompts(str(tmp_path / "b.parquet"), tok, 128, "PROMPT_FILE", lambda *x: None)
    assert a[0][0] == b[0][0] == "Review the lamp.\nfor my desk" and a[0][2] == b[0][2]
    assert "never read" not in a[0][1]


def test_records_that_fit_no_format_are_one_clear_line(tok, tmp_path, monkeypatch):
    cases = {
        "no_user.jsonl": ([{"messages": [SYSTEM, TRAILING]}], "record 0 (and 0 more) does not fit the file's format, chat"),
        "bad_role.json": ([{"conversations": sharegpt(PROMPT)}, {"conversations": [{"from": "robot", "value": "x"}]}],
                          "record 1 (and 0 more) does not fit the file's format, ShareGPT"),
        "mixed.json": ([{"instruction": "Review the lamp."}, {"messages": [USER2]}], "record 1 (and 0 more)"),
        "unknown.json": ([{"question": "Review the lamp."}], "the first record fits no prompt format"),
    }
    for name, (rows, needle) in cases.items():
        json.dump(rows, open(tmp_path / name, "w"))
        with pytest.raises(loading.ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            loading.load_prompts(str(tmp_path / name), tok, 128, "PROMPT_FILE", lambda *x: None)
    pd.DataFrame([{"prompt": "x"}]).to_parquet(tmp_path / "p.parquet")
    for module in ("pyarrow", "fastparquet"):  # as if neither Parquet engine were installed
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(loading.ConfigError, match="reading Parquet needs pyarrow: pip install pyarrow"):
        loading.read_records(str(tmp_path / "p.parquet"), "PROMPT_FILE")


def test_a_reward_function_replaces_the_reward_model(tmp_path):
    """The demo's gold rule as the reward: no reward model is loaded, the critic is the actor with a fresh head, and
    the training score is the gold score (the same function on the same prompt texts)."""
    s = ppo.train(make_config(tmp_path, TOTAL_STEPS=2, EVAL_SIZE=4, REWARD_MODEL=GOLD))
    m = s["models"]
    assert m["reward_is_function"] and m["critic"] == SFT and m["reward"] == GOLD
    assert any("the reward is a function" in n for n in s["notes"])
    for row in csv.DictReader(open(tmp_path / "ppo_metrics/training_metrics.csv")):
        assert float(row["objective/scores"]) == pytest.approx(float(row["objective/gold_scores"]), abs=1e-6)
    assert s["eval_before"]["rm_score"] == pytest.approx(s["eval_before"]["gold_score"], abs=1e-6)
    assert any(v.startswith("held-out reward-function score") for v in s["health"])  # not "RM score"


def test_reward_fn_adds_to_the_reward_model(tmp_path):
    fn = tmp_path / "short.py"
    fn.write_text("def score(prompts, responses):\n    return [-0.5 * (len(r.split()) > 5) for r in responses]\n")
    roles = loading.load_roles(make_config(tmp_path, REWARD_FN=str(fn)), CPU, torch.float32)
    prompts = loading.load_prompts(os.path.join(ROOT, "data/ppo_eval.json"), roles.tok, 128, "EVAL_FILE", lambda *x: None)[:6]
    batch = ppo.rollout(roles, prompts, 0.1, make_config())
    args = (batch["query_responses"], batch["attention_mask"], batch["context_length"], prompts, batch["replies"],
            batch["ended"].tolist())
    rm = roles.rm(*args)
    penalty = torch.tensor([-0.5 * (len(r.split()) > 5) for r in batch["replies"]])
    assert torch.allclose(batch["raw_scores"], rm + penalty) and (penalty < 0).any()
    with pytest.raises(loading.ConfigError, match="REWARD_FN file"):
        loading.load_roles(make_config(tmp_path, REWARD_FN=str(tmp_path / "missing.py")), CPU, torch.float32)


def test_tensorboard_holds_every_csv_column_the_evaluations_samples_and_config(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ppo.train(make_config(tmp_path, TOTAL_STEPS=2, EVAL_SIZE=4, SAMPLE_EVERY=1, REPORT_TO="tensorboard"))
    rows = list(csv.DictReader(open(tmp_path / "ppo_metrics/training_metrics.csv")))
    ea = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    finite = {k for r in rows for k, v in r.items() if math.isfinite(float(v))}
    assert finite <= scalars and "objective/kl" in scalars and "lr" in scalars
    for k in ("objective/kl", "objective/scores", "loss/policy_avg"):
        assert [e.step for e in ea.Scalars(k)] == [1, 2]
        assert [e.value for e in ea.Scalars(k)] == pytest.approx([float(r[k]) for r in rows], rel=1e-6)
    assert [e.step for e in ea.Scalars("eval/rm_score")] == [0, 2]  # before and after training
    texts = set(ea.Tags()["tensors"])
    assert {"config/text_summary", "samples/text_summary"} <= texts


def test_wandb_offline_and_missing_packages(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    ppo.train(make_config(tmp_path, TOTAL_STEPS=2, EVAL_FILE="", SAMPLE_EVERY=1, REPORT_TO="wandb,tensorboard"))
    run_dir, = glob.glob(str(tmp_path / "wandb/offline-run-*"))
    history = open(glob.glob(os.path.join(run_dir, "run-*.wandb"))[0], "rb").read()
    for column in next(csv.DictReader(open(tmp_path / "ppo_metrics/training_metrics.csv"))):
        if not column.startswith("eval/"):
            assert column.encode() in history, column
    tables = glob.glob(os.path.join(run_dir, "files/media/table/samples_*.table.json"))
    samples = [json.loads(line) for line in open(tmp_path / "ppo_metrics/samples.jsonl")]
    assert len(tables) == 2 and json.load(open(sorted(tables)[0]))["columns"] == ["prompt", "reply", "score"]
    assert any(json.load(open(t))["data"][0][1] == samples[0]["reply"] for t in tables)
    # a W&B login or network failure: one line, and the earlier outputs are untouched
    import wandb
    before = (tmp_path / "ppo_metrics/training_metrics.csv").read_bytes()
    monkeypatch.setattr(wandb, "init", lambda **kw: (_ for _ in ()).throw(RuntimeError("api_key not configured")))
    with pytest.raises(loading.ConfigError, match="wandb.init failed .RuntimeError: api_key not configured.; run `wandb login`"):
        ppo.train(make_config(tmp_path, TOTAL_STEPS=3, EVAL_FILE="", REPORT_TO="wandb", RESUME="never"))
    assert (tmp_path / "ppo_metrics/training_metrics.csv").read_bytes() == before
    assert len(os.listdir(tmp_path / "checkpoints")) == 1  # not moved aside
    # a missing package or an unknown name: one line, before anything is written
    real = plumbing.importlib.util.find_spec
    monkeypatch.setattr(plumbing.importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    with pytest.raises(loading.ConfigError, match="REPORT_TO=wandb needs the wandb package: pip install wandb"):
        plumbing.Dashboards("tensorboard,wandb")
    with pytest.raises(loading.ConfigError, match="'mlflow' is not one of"):
        plumbing.Dashboards("mlflow")


def test_lr_schedule_warmup_cosine_and_exact_resume(tmp_path):
    # 3 PPO steps x 2 epochs x 1 optimizer step = 6 optimizer steps; 2 of warm-up, then cosine to 0 over 4.
    # Each row logs the rate of its first optimizer step: steps 0, 2, 4 -> 0, peak, peak x (1 + cos(pi/2)) / 2.
    c = dict(TOTAL_STEPS=3, EVAL_FILE="", LR_SCHEDULE="cosine", WARMUP_STEPS=2, LEARNING_RATE=1e-4)
    ppo.train(make_config(tmp_path / "a", **c))
    a = list(csv.DictReader(open(tmp_path / "a/ppo_metrics/training_metrics.csv")))
    peak = 1e-4
    expected = [0.0, peak * 0.5 * (1 + math.cos(math.pi * 0 / 4)), peak * 0.5 * (1 + math.cos(math.pi * 2 / 4))]
    assert [float(r["lr"]) for r in a] == pytest.approx(expected, abs=1e-12)
    # resume: the same run again from its step-2 checkpoint gives the same rows (the schedule's state is saved;
    # TOTAL_STEPS sets its length, so the run keeps its length)
    ppo.train(make_config(tmp_path / "c", **dict(c, SAVE_EVERY=1)))
    ckpt = tmp_path / "c/checkpoints"
    os.rename(ckpt / "step_00000003", tmp_path / "step3_moved")  # keep step 2 as the newest checkpoint
    ppo.train(make_config(tmp_path / "c", **dict(c, SAVE_EVERY=1)))
    c_rows = list(csv.DictReader(open(tmp_path / "c/ppo_metrics/training_metrics.csv")))
    assert_same_rows(a, c_rows)
    with pytest.raises(loading.ConfigError, match="LR_SCHEDULE = 'step'"):
        ppo.train(make_config(tmp_path / "d", LR_SCHEDULE="step"))
