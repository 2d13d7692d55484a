"""Never lose a run: exact resume, clean interrupts, NaN guard, and one clear line for each kind of bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import loading
import plumbing
import ppo

from conftest import RM, ROOT, SFT, assert_same_rows, make_args, make_config as config, metrics_rows as rows, roles_of

SCRIPT = os.path.join(ROOT, "code/ppo.py")
SMALL = make_args()


def test_four_steps_equal_two_then_two_resumed(tmp_path):
    ppo.train(config(tmp_path / "a", TOTAL_STEPS=4))
    ppo.train(config(tmp_path / "b", TOTAL_STEPS=2))
    s = ppo.train(config(tmp_path / "b", TOTAL_STEPS=4))  # RESUME=auto continues from step 2
    assert s["status"] == "finished" and s["steps"] == 4
    assert_same_rows(rows(tmp_path / "a"), rows(tmp_path / "b"))
    assert sorted(os.listdir(tmp_path / "b/checkpoints")) == ["step_00000002", "step_00000004"]
    # a finished run is not redone: outputs stay as they are
    before = (tmp_path / "b/ppo_metrics/summary.json").read_bytes()
    assert ppo.train(config(tmp_path / "b", TOTAL_STEPS=4)) is None
    assert (tmp_path / "b/ppo_metrics/summary.json").read_bytes() == before
    # a damaged checkpoint is one clear line that names it, and nothing is written
    for name, damage in (("state.pt", b"PK\x03\x04 cut off"), ("meta.json", b'{"step": 4, "conf')):
        (tmp_path / "b/checkpoints/step_00000004" / name).write_bytes(damage)
        with pytest.raises(loading.ConfigError, match=f"step_00000004: {name} cannot be read"):
            ppo.train(config(tmp_path / "b", TOTAL_STEPS=5))
        assert (tmp_path / "b/ppo_metrics/summary.json").read_bytes() == before


def test_a_checkpoint_from_before_newer_settings_resumes_exactly(tmp_path, capsys):
    """A run started before an upgrade that added settings (here LoRA, critic-free advantages, schedules, reward
    functions, dashboards) resumes after it, as long as the new settings keep their defaults."""
    new = ["REWARD_FN", "ADVANTAGE", "SAMPLES_PER_PROMPT", "GRPO_STD", "KL_IN", "LR_SCHEDULE", "WARMUP_STEPS",
           "LORA_R", "LORA_ALPHA", "LORA_TARGET_MODULES", "REPORT_TO"]
    ppo.train(config(tmp_path / "a", TOTAL_STEPS=4, EVAL_FILE=""))
    ppo.train(config(tmp_path / "b", TOTAL_STEPS=2, EVAL_FILE=""))
    ckpt = tmp_path / "b/checkpoints/step_00000002"
    state = torch.load(ckpt / "state.pt", weights_only=False)
    for k in new:
        del state["config"][k]
    del state["scheduler"]
    torch.save(state, ckpt / "state.pt")
    meta = json.load(open(ckpt / "meta.json"))
    meta["config"] = {k: v for k, v in meta["config"].items() if k not in new}
    json.dump(meta, open(ckpt / "meta.json", "w"))
    # a new setting away from its default is a change of config
    with pytest.raises(loading.ConfigError, match="comes from a different config .KL_IN None -> 'loss'."):
        ppo.train(config(tmp_path / "b", TOTAL_STEPS=4, EVAL_FILE="", KL_IN="loss", RESUME=str(ckpt)))
    capsys.readouterr()
    assert ppo.train(config(tmp_path / "b", TOTAL_STEPS=4, EVAL_FILE=""))["steps"] == 4
    assert f"resuming from {ckpt}: 2 steps done" in capsys.readouterr().out
    assert_same_rows(rows(tmp_path / "a"), rows(tmp_path / "b"))


def test_checkpoints_rotate_and_a_changed_config_starts_fresh_keeping_the_old_ones(tmp_path, capsys):
    ppo.train(config(tmp_path, TOTAL_STEPS=5, SAVE_EVERY=1, KEEP_CHECKPOINTS=2))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000004", "step_00000005"]
    meta = json.load(open(tmp_path / "checkpoints/step_00000005/meta.json"))
    assert meta["step"] == 5 and meta["config"]["SAVE_EVERY"] == 1
    s = ppo.train(config(tmp_path, TOTAL_STEPS=2, LEARNING_RATE=1e-5))
    assert s["steps"] == 2 and "config changed (LEARNING_RATE" in capsys.readouterr().out
    aside = [n for n in os.listdir(tmp_path) if n.startswith("checkpoints_before_")]
    assert len(aside) == 1 and sorted(os.listdir(tmp_path / aside[0])) == ["step_00000004", "step_00000005"]
    # an explicit checkpoint of another config is a clear error
    with pytest.raises(loading.ConfigError, match="different config"):
        ppo.train(config(tmp_path / "x", RESUME=str(tmp_path / aside[0]), LEARNING_RATE=1e-5))


def wait_for_rows(path, n, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read()[-2000:])
        if os.path.exists(path) and sum(1 for _ in open(path)) > n:
            return
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_sigterm_stops_after_the_step_in_flight_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, SCRIPT, f"--output_dir={out}", "--total_steps=500", "--save_every=1000"] + SMALL
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_rows(out / "ppo_metrics/training_metrics.csv", 2, p)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 143
    s = json.load(open(out / "ppo_metrics/summary.json"))
    done = len(rows(out))
    assert s["status"] == "interrupted" and s["interrupted_by"] == "SIGTERM" and s["steps"] == done
    assert "code/ppo.py" in s["resume_command"] and "--total_steps=500" in s["resume_command"]
    assert os.listdir(out / "checkpoints") == [f"step_{done:08d}"]
    assert (out / "ppo_metrics/training_curves.png").exists()
    r = subprocess.run([sys.executable, SCRIPT, f"--output_dir={out}", f"--total_steps={done + 2}",
                        "--save_every=1000"] + SMALL, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"step_{done:08d}: {done} steps done" in r.stdout
    assert [int(x["step"]) for x in rows(out)] == list(range(1, done + 3))
    assert "taking it over" not in r.stdout and not (out / plumbing.LOCK_FILE).exists()  # SIGTERM gave the lock back


def test_a_second_run_in_the_same_output_dir_refuses_naming_the_first(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, SCRIPT, f"--output_dir={out}", "--total_steps=500", "--save_every=1", "--eval_file="] + SMALL
    first = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_rows(out / "ppo_metrics/training_metrics.csv", 1, first)
    assert plumbing.lock_owner(out / plumbing.LOCK_FILE) == first.pid
    second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [x for x in second.stderr.splitlines() if x.strip()]
    assert second.returncode == 2 and len(lines) == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert f"is in use by another run (process {first.pid}" in lines[0]
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 143  # the first run went on undisturbed
    assert not (out / plumbing.LOCK_FILE).exists()


def test_a_half_written_checkpoint_is_skipped_and_said(tmp_path, capsys):
    ppo.train(config(tmp_path, TOTAL_STEPS=2, SAVE_EVERY=1, EVAL_FILE=""))
    os.remove(tmp_path / "checkpoints/step_00000002/meta.json")  # as a run stopped while writing it leaves it
    assert ppo.train(config(tmp_path, TOTAL_STEPS=3, SAVE_EVERY=1, EVAL_FILE=""))["steps"] == 3
    out = capsys.readouterr().out
    assert f"note: {tmp_path}/checkpoints/step_00000002 is incomplete (a run stopped while writing it) and is " \
           f"skipped; the newest complete one is {tmp_path}/checkpoints/step_00000001" in out
    assert f"resuming from {tmp_path}/checkpoints/step_00000001: 1 steps done" in out


def test_ctrl_c_during_setup_says_there_is_nothing_to_resume(tmp_path):
    args = [sys.executable, "-u", SCRIPT, f"--output_dir={tmp_path}", "--total_steps=2"] + SMALL
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().startswith("PROMPT_FILE")  # loading: models are in, prompts being read
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=120) == 130
    err = p.stderr.read()
    assert "before any checkpoint was written: there is nothing to resume" in err and "Traceback" not in err, err


@pytest.fixture
def full_disk(tmp_path):
    """A 40 MB tmpfs: room for the demo's outputs and one checkpoint (22 MB), not for a second one."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    yield mount
    subprocess.run(["umount", str(mount)])


def test_a_full_disk_keeps_the_earlier_checkpoint_and_the_run_resumes(full_disk, tmp_path):
    out = full_disk / "run"
    args = [sys.executable, SCRIPT, "--total_steps=4", "--save_every=1", "--keep_checkpoints=2", "--eval_file=",
            "--save_model=false"] + SMALL
    r = subprocess.run(args + [f"--output_dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith("PPO:")]  # the progress bar aside
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines[0].startswith("error: no space left on the device") and "MB needed" in lines[0], lines[0]
    kept = plumbing.list_checkpoints(out / "checkpoints")
    assert [os.path.basename(k) for k in kept] == ["step_00000001"] and f"{kept[-1]}, resumes the run" in lines[0]
    assert not plumbing.incomplete_checkpoints(out / "checkpoints")  # the half-written one was removed
    assert len(rows(out)) == 2 and not (out / plumbing.LOCK_FILE).exists()
    shutil.copytree(out, tmp_path / "moved")  # with room again, the same command resumes from step 1
    r = subprocess.run(args + [f"--output_dir={tmp_path / 'moved'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "step_00000001: 1 steps done" in r.stdout, r.stderr[-2000:]
    assert [int(x["step"]) for x in rows(tmp_path / "moved")] == [1, 2, 3, 4]


def test_kill_9_resumes_from_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, SCRIPT, f"--output_dir={out}", "--total_steps=500", "--save_every=2"] + SMALL
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_rows(out / "ppo_metrics/training_metrics.csv", 5, p)
    p.kill()
    p.wait()
    last = int(os.path.basename(plumbing.list_checkpoints(out / "checkpoints")[-1]).split("_")[1])  # not a half-written one
    r = subprocess.run([sys.executable, SCRIPT, f"--output_dir={out}", f"--total_steps={last + 1}",
                        "--save_every=2"] + SMALL, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming from {out}/checkpoints/step_{last:08d}" in r.stdout
    assert [int(x["step"]) for x in rows(out)] == list(range(1, last + 2))  # rows after the checkpoint are redone
    # the killed run's lock did not block this one, and this one gave its own back
    assert f"was left by process {p.pid}, which is no longer running; taking it over" in r.stdout
    assert not (out / plumbing.LOCK_FILE).exists()


def test_non_finite_gradients_skip_the_update():
    c = config("unused", GRAD_ACCUM=1, PPO_EPOCHS=1)
    actor = loading.load_model("causal", SFT, "ACTOR_MODEL", torch.device("cpu"), torch.float32)
    critic = loading.load_model("score", RM, "CRITIC_MODEL", torch.device("cpu"), torch.float32)
    tok, _ = loading.load_tokenizer(SFT, "ACTOR_MODEL")
    ref = loading.freeze(loading.load_model("causal", SFT, "REF_MODEL", torch.device("cpu"), torch.float32))
    scorer = loading.RewardScorer(loading.freeze(loading.load_model("score", RM, "REWARD_MODEL", torch.device("cpu"),
                                                        torch.float32)), tok, tok, torch.device("cpu"))
    prompts = loading.load_prompts(c["PROMPT_FILE"], tok, 128, "PROMPT_FILE")[:4]
    batch = ppo.rollout(roles_of(tok, actor, ref, critic, scorer, [tok.eos_token_id]), prompts, 0.1, c)
    batch["advantages"] = batch["advantages"].masked_fill(batch["mask"], float("nan"))
    params = list(actor.parameters()) + list(critic.parameters())
    before = [p.clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3)
    stats = ppo.ppo_update(ppo.Trainer(actor, critic, params, opt, None), batch, c)
    assert stats[-1]["train/skipped_frac"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, params)) and all(p.grad is None for p in params)


def test_steps_of_nan_scores_stop_the_run_keeping_the_last_good_checkpoint(tmp_path, monkeypatch):
    ppo.train(config(tmp_path, TOTAL_STEPS=2))
    real = loading.RewardScorer.__call__
    monkeypatch.setattr(loading.RewardScorer, "__call__",
                        lambda self, *a: real(self, *a) if a[0].shape[0] > 4 else torch.full((a[0].shape[0],), float("nan")))
    with pytest.raises(plumbing.TrainingDiverged, match=r"3 PPO steps in a row .*step_00000002") as stopped:
        ppo.train(config(tmp_path, TOTAL_STEPS=10, EVAL_EVERY=0))
    # the run closed its CSV on the way out (its frames are still alive in the traceback)
    import gc
    import io
    assert stopped.traceback and not [f for f in gc.get_objects() if type(f) is io.TextIOWrapper
                                      and not f.closed and "training_metrics" in str(f.name)]
    r = rows(tmp_path)
    assert [float(x["train/bad_scores"]) for x in r] == [0, 0, 1, 1, 1]
    assert os.listdir(tmp_path / "checkpoints") == ["step_00000002"]
    s = plumbing.health_verdicts(__import__("pandas").DataFrame([{k: float(v) for k, v in x.items()} for x in r]),
                                 config(tmp_path), None, None)
    assert any("non-finite" in h for h in s)


def test_health_verdicts_flag_over_optimisation_of_the_reward_model():
    pd = __import__("pandas")
    rm = [0.7] * 10 + [2.3] * 10

    def verdicts(gold, ev_gold_after=2.5):
        df = pd.DataFrame({"objective/scores": rm, "objective/gold_scores": gold, "objective/kl": [5.0] * 20})
        return plumbing.health_verdicts(df, ppo.DEFAULTS, {"rm_score": 0.1, "gold_score": 0.3, "kl": 0.0},
                                   {"rm_score": 2.2, "gold_score": ev_gold_after, "kl": 5.0})
    assert not any("over-optimisation" in v for v in verdicts([1.0] * 10 + [3.0] * 10))  # gold follows the RM
    assert any("over-optimisation" in v for v in verdicts([1.2] * 20))                   # gold stands still
    assert any("over-optimisation" in v for v in verdicts([1.2] * 10 + [0.5] * 10))      # gold falls
    assert any("over-optimisation" in v for v in verdicts([1.0] * 10 + [3.0] * 10, ev_gold_after=0.2))  # held out


# ---- bad input: one line, exit 2, no traceback, earlier outputs untouched -------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    r = subprocess.run([sys.executable, SCRIPT, f"--output_dir={out}", "--total_steps=2"] + SMALL, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def snapshot(out):
    """Every file under out, by its path there (ppo_model/actor/config.json and .../critic/config.json are two)."""
    return {os.path.relpath(os.path.join(d, f), out): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(out) for f in fs}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "no_score.py").write_text("def other(p, r):\n    return [0.0]\n")
    (d / "wrong_count.py").write_text("def score(p, r):\n    return [1.0]\n")
    (d / "nan.py").write_text("def score(p, r):\n    return [float('nan')] * len(r)\n")
    (d / "empty.json").write_text("[]")
    (d / "not_json.txt").write_text("instruction: hello\n")
    (d / "no_instruction.jsonl").write_text('{"input": "x"}\n')
    (d / "a_file").write_text("x")
    (d / "latin1.json").write_bytes('[{"instruction": "Beschreibe die Lampe, bitte", "input": "Größe"}]'.encode("latin-1"))
    (d / "raises.py").write_text("def score(p, r):\n    raise KeyError('product')\n")
    good = [json.dumps({"instruction": f"Review the lamp, part {i}."}) for i in range(40)]
    (d / "damaged.jsonl").write_text("\n".join(good[:20] + ['{"instruction": "cut off'] + good[20:]) + "\n")
    (d / "empty_prompts.json").write_text(json.dumps([{"instruction": " ", "input": ""}] * 40))
    (d / "exits.py").write_text("import sys\ndef score(p, r):\n    return [0.0] * len(r)\nsys.exit(0)\n")
    (d / "exits_in_score.py").write_text("import sys\ndef score(p, r):\n    sys.exit(1)\n")
    (d / "hangs.py").write_text("import time\ndef score(p, r):\n    while True:\n        time.sleep(1)\n")
    from transformers import GPT2Config, GPT2ForSequenceClassification, T5Config, T5ForConditionalGeneration
    two = GPT2ForSequenceClassification(GPT2Config(vocab_size=800, n_embd=16, n_layer=1, n_head=2, num_labels=2))
    two.save_pretrained(d / "rm2")
    T5ForConditionalGeneration(T5Config(vocab_size=800, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)) \
        .save_pretrained(d / "t5")  # an encoder-decoder: AutoModelForCausalLM has no class for it
    # model folders as they arrive broken: weights only, custom code, a config that is not JSON, cut-off weights
    shutil.copytree(SFT, d / "no_tokenizer", ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
    for name in ("remote_code", "bad_config", "truncated", "quantised"):
        shutil.copytree(SFT, d / name)
    cfg = json.load(open(d / "remote_code/config.json"))
    cfg.update(model_type="acme_lm", architectures=["AcmeForCausalLM"],
               auto_map={"AutoConfig": "modeling_acme.AcmeConfig", "AutoModelForCausalLM": "modeling_acme.AcmeForCausalLM"})
    json.dump(cfg, open(d / "remote_code/config.json", "w"))
    cfg = json.load(open(d / "quantised/config.json"))  # as a 4-bit checkpoint's config says it
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    json.dump(cfg, open(d / "quantised/config.json", "w"))
    (d / "bad_config/config.json").write_text('{"model_type": "gpt2", "n_embd": 64,')
    weights = (d / "truncated/model.safetensors").read_bytes()
    (d / "truncated/model.safetensors").write_bytes(weights[:len(weights) // 2])
    return d


BAD = [
    (lambda d: [f"--gold_reward={d}/no_score.py"], "has no function score"),
    (lambda d: [f"--gold_reward={d}/wrong_count.py"], "returned 1 values"),
    (lambda d: [f"--gold_reward={d}/nan.py"], "NaN or infinity"),
    (lambda d: [f"--prompt_file={d}/empty.json"], "holds no records"),
    (lambda d: [f"--prompt_file={d}/not_json.txt"], "neither JSON nor JSONL"),
    (lambda d: [f"--eval_file={d}/no_instruction.jsonl"], "EVAL_FILE"),
    (lambda d: [f"--eval_file={d}/missing.json"], "EVAL_FILE"),
    (lambda d: [f"--actor_model={RM}"], "not a causal LM"),
    (lambda d: [f"--reward_model={SFT}"], "not a sequence-classification model"),
    (lambda d: [f"--reward_model={d}/rm2"], "exactly one"),
    (lambda d: ["--actor_model=someorg/some-model"], "cannot load"),
    (lambda d: ["--ppo_epochs=0"], "PPO_EPOCHS"),
    (lambda d: ["--max_new_tokens=-3"], "MAX_NEW_TOKENS"),
    (lambda d: ["--mini_batch_size=2000"], "fewer than one rollout batch"),
    (lambda d: ["--resume=/nonexistent"], "holds no checkpoint"),
    (lambda d: [f"--prompt_file={d}/latin1.json"], "is not UTF-8 text"),
    (lambda d: [f"--gold_reward={d}/raises.py"], "score() failed (KeyError"),
    (lambda d: [f"--actor_model={d}/t5"], "cannot be loaded as a causal LM"),
    (lambda d: [f"--actor_model={d}/no_tokenizer"], "lacks the model's tokenizer files"),
    (lambda d: [f"--actor_model={d}/remote_code"], "needs its own Python code"),
    (lambda d: [f"--actor_model={d}/bad_config"], "is not valid JSON"),
    (lambda d: [f"--actor_model={d}/truncated"], "truncated or corrupt"),
    (lambda d: ["--stop_tokens=<|nope|>"], "not one token of the actor's tokenizer"),
    (lambda d: [f"--actor_model={d}/quantised", "--lora_r=8"], "is a quantised checkpoint (bitsandbytes)"),
    (lambda d: ["--lora_r=8", "--lora_target_modules=q_proj"], "LORA_TARGET_MODULES 'q_proj'"),
    (lambda d: [f"--prompt_file={d}/damaged.jsonl"], "line 21 is not valid JSON"),
    (lambda d: [f"--prompt_file={d}/empty_prompts.json"], "record 0 (and 39 more) has an empty prompt"),
    (lambda d: [f"--gold_reward={d}/exits.py"], "called sys.exit(0) while being imported"),
    (lambda d: [f"--gold_reward={d}/exits_in_score.py"], "score() called sys.exit(1)"),
    (lambda d: [f"--reward_model={d}/hangs.py", "--score_timeout=2"], "did not return within SCORE_TIMEOUT = 2 s"),
    (lambda d: ["--init_kl_coef=nan"], "INIT_KL_COEF = nan must be a finite number"),
    (lambda d: ["--learning_rate=inf"], "LEARNING_RATE = inf must be a finite number"),
    (lambda d: ["--seed=-1"], "SEED = -1 must lie in [0, 2**32 - 1]"),
    (lambda d: ["--warmup_steps=100"], "WARMUP_STEPS = 100 is more than the run's 6 optimizer steps"),
]


# Each of these runs in a process of its own, as a user meets it: user code that exits, hangs, or must not load.
OWN_PROCESS = {"has no function score", "cannot load", "called sys.exit(0) while being imported",
               "score() called sys.exit(1)", "did not return within SCORE_TIMEOUT = 2 s"}
# The others run one after another in one process, through the same entry point as `python code/ppo.py`
# (plumbing.main: its return value is the exit code), each with its own stderr and warnings state: a torch and
# transformers import per case would cost ~5 s each (~3 min of the suite).
ONE_PROCESS = """
import contextlib, io, json, os, sys, traceback, warnings
root, out, cases, results = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3])), []
sys.path[:0] = [os.path.join(root, "code"), os.path.join(root, "data"), os.path.join(root, "tests")]
import plumbing, ppo
from test_reliability import snapshot
for argv in cases:
    before, err = snapshot(out), io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stderr(err):
        try:
            code = plumbing.main(ppo.train, argv, ppo.DEFAULTS, ppo.__doc__, ppo.__file__)
        except BaseException:
            code = None
            traceback.print_exc(file=err)
    results.append({"code": code, "stderr": err.getvalue(), "intact": snapshot(out) == before})
json.dump(results, open(sys.argv[4], "w"))
"""


def bad_run_args(finished_run, bad_args, bad_files):
    return [f"--output_dir={finished_run}", "--total_steps=3"] + SMALL + bad_args(bad_files)


@pytest.fixture(scope="module")
def batched_bad_runs(finished_run, bad_files, tmp_path_factory):
    """{index in BAD: {code, stderr, intact}} for the cases not in OWN_PROCESS, from one process."""
    d = tmp_path_factory.mktemp("batched")
    keys = [i for i, (_, needle) in enumerate(BAD) if needle not in OWN_PROCESS]
    json.dump([bad_run_args(finished_run, BAD[i][0], bad_files) for i in keys], open(d / "cases.json", "w"))
    r = subprocess.run([sys.executable, "-c", ONE_PROCESS, ROOT, str(finished_run), str(d / "cases.json"),
                        str(d / "results.json")], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr[-3000:]  # nothing said outside the cases
    return dict(zip(keys, json.load(open(d / "results.json"))))


@pytest.mark.parametrize("i", range(len(BAD)), ids=[b[1] for b in BAD])
def test_bad_input_leaves_earlier_outputs_intact(i, finished_run, bad_files, request):
    bad_args, needle = BAD[i]
    if needle in OWN_PROCESS:
        before = snapshot(finished_run)
        r = subprocess.run([sys.executable, SCRIPT] + bad_run_args(finished_run, bad_args, bad_files), cwd=ROOT,
                           capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        code, stderr, intact = r.returncode, r.stderr, snapshot(finished_run) == before
    else:
        res = request.getfixturevalue("batched_bad_runs")[i]
        code, stderr, intact = res["code"], res["stderr"], res["intact"]
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert code == 2 and "Traceback" not in stderr, stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], stderr[-2000:]
    assert intact


def test_a_run_holding_the_output_dir_refuses_a_second_and_changes_nothing(finished_run):
    lock = finished_run / plumbing.LOCK_FILE
    lock.write_text(f"{os.getpid()}\n")  # a live process (this test's) holds the folder
    try:
        before = snapshot(finished_run)
        r = subprocess.run([sys.executable, SCRIPT, f"--output_dir={finished_run}", "--total_steps=3"] + SMALL,
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 2 and len(lines) == 1 and f"in use by another run (process {os.getpid()}" in lines[0]
        assert snapshot(finished_run) == before
    finally:
        lock.unlink()


def test_output_dir_that_cannot_be_created(bad_files, tmp_path):
    with pytest.raises(loading.ConfigError, match="not writable"):
        ppo.train(config(tmp_path, OUTPUT_DIR=str(bad_files / "a_file" / "out")))


@pytest.mark.parametrize("pad", [None, "eos"])
def test_missing_pad_or_pad_equal_to_eos_is_handled(tmp_path, pad):
    from transformers import AutoTokenizer
    shutil.copytree(SFT, tmp_path / "actor")
    tok = AutoTokenizer.from_pretrained(tmp_path / "actor")
    tok.pad_token = None if pad is None else tok.eos_token
    tok.save_pretrained(tmp_path / "actor")
    tok2, notes = loading.load_tokenizer(str(tmp_path / "actor"), "ACTOR_MODEL")
    assert len(tok2) == len(tok) and tok2.pad_token_id == tok2.eos_token_id  # no token added; pad is a real token
    assert (pad is None) == any("no pad token" in n for n in notes)
    s = ppo.train(config(tmp_path / "out", ACTOR_MODEL=str(tmp_path / "actor"), TOTAL_STEPS=2))
    assert s["steps"] == 2 and s["eval_before"]["kl"] == pytest.approx(0.0, abs=1e-5)
    # padding is carried by masks, so the same seed gives the same run as with the demo's own pad token
    same = ppo.train(config(tmp_path / "demo", TOTAL_STEPS=2))
    assert s["eval_after"] == pytest.approx(same["eval_after"], abs=1e-6)
