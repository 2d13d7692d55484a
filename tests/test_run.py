"""The run end to end: its three outputs, the CLI overrides and the one-line errors for bad input."""
import csv
import json
import os
import subprocess
import sys

import pytest

import loading
import plumbing
import ppo

from conftest import ROOT, SFT, assert_same_rows, make_args

SCRIPT = os.path.join(ROOT, "code/ppo.py")
QUICK = make_args(TOTAL_STEPS=3, MAX_NEW_TOKENS=16, EVAL_EVERY=2, SAMPLE_EVERY=1, SAVE_MODEL=True)


def run(args, cwd=ROOT):
    return subprocess.run([sys.executable, SCRIPT] + args, capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = run(QUICK + [f"--output_dir={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_outputs_csv_png_summary(quick_run):
    out, r = quick_run
    m = out / "ppo_metrics"
    rows = list(csv.DictReader(open(m / "training_metrics.csv")))
    assert [int(x["step"]) for x in rows] == [1, 2, 3]
    for col in ["step", "episodes", "objective/scores", "objective/rlhf_reward", "objective/non_score_reward",
                "objective/kl", "objective/entropy", "objective/kl_coef", "policy/approxkl_avg", "policy/clipfrac_avg",
                "policy/entropy_avg", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg", "val/ratio",
                "val/explained_var", "resp/length_mean", "resp/eos_frac", "lr", "time/generate_s", "time/score_s",
                "time/train_s", "time/tokens_per_s", "objective/gold_scores", "eval/rm_score"]:
        assert col in rows[0], col
    assert int(rows[-1]["episodes"]) == 3 * 4
    assert rows[1]["eval/rm_score"] != "nan" and rows[0]["eval/rm_score"] == "nan"  # EVAL_EVERY=2
    import matplotlib.image
    img = matplotlib.image.imread(m / "training_curves.png")
    assert img.shape[0] > 500 and img.shape[1] > 500
    s = json.load(open(m / "summary.json"))
    assert s["status"] == "finished" and s["steps"] == 3 and s["episodes"] == 12
    for key in ("health", "eval_before", "eval_after", "time_split_s", "metrics", "config", "models", "data", "files",
                "samples"):
        assert key in s, key
    assert {"rm_score", "kl", "gold_score"} <= set(s["eval_before"])
    assert s["eval_before"]["kl"] == pytest.approx(0.0, abs=1e-5)  # before training the actor is the reference
    assert s["config"]["TOTAL_STEPS"] == 3 and json.load(open(m / "config.json"))["config"]["MINI_BATCH_SIZE"] == 4
    assert len(s["samples"]) == 8 and {"reply_before", "reply_after", "gold_after"} <= set(s["samples"][0])
    assert all(isinstance(h, str) for h in s["health"])
    assert (out / "ppo_model/actor/model.safetensors").exists() and (out / "ppo_model/critic/config.json").exists()
    assert (m / "samples.jsonl").read_text().count("\n") >= 3
    assert "TOTAL_STEPS=3" in r.stdout  # the resolved config is printed at start


def test_seed_makes_a_cpu_run_repeatable(quick_run, tmp_path):
    out, _ = quick_run
    r = run(QUICK + [f"--output_dir={tmp_path}"])
    assert r.returncode == 0, r.stderr[-2000:]
    a = list(csv.DictReader(open(out / "ppo_metrics/training_metrics.csv")))
    b = list(csv.DictReader(open(tmp_path / "ppo_metrics/training_metrics.csv")))
    assert_same_rows(a, b)  # wall-clock columns differ


def test_overrides_parse_by_type_and_case_insensitively():
    cfg = {k: getattr(ppo, k) for k in ppo.CONFIG_KEYS}
    got = plumbing.parse_overrides(["--Total_Steps=7", "--learning_rate=1e-6", "--adaptive_kl=false", "--ref_model=x"], cfg)
    assert got == {"TOTAL_STEPS": 7, "LEARNING_RATE": 1e-6, "ADAPTIVE_KL": False, "REF_MODEL": "x"}
    assert isinstance(plumbing.parse_overrides(["--ppo_target=6"], cfg)["PPO_TARGET"], float)


@pytest.mark.parametrize("args,needle", [
    (["--totl_steps=5"], "did you mean --total_steps"),
    (["--total_steps=many"], "expected int"),
    (["--adaptive_kl=maybe"], "expected true or false"),
    (["total_steps=5"], "overrides look like"),
    (["--prompt_file=nope.json"], "not found"),
    (["--actor_model=data/models/nope"], "not found"),
    (["--mini_batch_size=0"], "must be a positive integer"),
    (["--ppo_target=0"], "PPO_TARGET"),
    (["--temperature=-1"], "TEMPERATURE"),
    (["--kl_estimator=k2"], "KL_ESTIMATOR"),
    (["--device=cuda"], "CUDA is not available"),
    (["--gold_reward=nope.py"], "GOLD_REWARD"),
    (["--max_prompt_tokens=3"], "longer than MAX_PROMPT_TOKENS"),
])
def test_bad_input_is_one_clear_line(args, needle, tmp_path):
    r = run(args + [f"--output_dir={tmp_path}", "--total_steps=1"] if not args[0].startswith("--totl") else args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr[-1000:]


def test_prompt_file_problems(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json\n")
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    no_instr = tmp_path / "noinstr.jsonl"
    no_instr.write_text('{"input": "x"}\n')
    for path, needle in [(bad_json, "neither JSON nor JSONL"), (empty, "holds no records")]:
        with pytest.raises(loading.ConfigError, match=needle):
            loading.read_records(str(path), "PROMPT_FILE")
    records = [{"instruction": "Review the lamp."}, {"instruction": "Größe?"}]
    for name, text in [("list.json", json.dumps(records)), ("lines.jsonl", "\n".join(map(json.dumps, records)))]:
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())  # a byte-order mark, as some editors save
        assert loading.read_records(str(tmp_path / name), "PROMPT_FILE") == records
    tok, _ = loading.load_tokenizer(SFT, "ACTOR_MODEL")
    with pytest.raises(loading.ConfigError, match="the first record fits no prompt format"):
        loading.load_prompts(str(no_instr), tok, 128, "PROMPT_FILE")


def test_help_lists_every_constant_with_its_comment():
    r = run(["--help"])
    assert r.returncode == 0
    for k in ppo.CONFIG_KEYS:
        assert f"--{k.lower()}" in r.stdout
    assert "KL target of the adaptive controller" in r.stdout


def test_help_into_a_closed_pipe_ends_quietly():
    """`python code/ppo.py --help | head`: the reader is gone before the help is written; no traceback."""
    p = subprocess.Popen([sys.executable, SCRIPT, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # every write of the help now meets a closed pipe
    assert p.wait(timeout=60) == 0 and p.stderr.read() == b""


def test_benchmark_reports_phases_floor_and_overhead(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "code/benchmark.py"), "--steps=3", "--mini_batch_size=4",
                        "--ppo_buffer_size=1", "--ppo_epochs=1", "--max_new_tokens=8", "--device=cpu",
                        f"--output_dir={tmp_path}"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res == json.load(open(tmp_path / "benchmark.json"))
    # the run's metrics beside it, and no checkpoint left behind (3.2 GB each on SmolLM2)
    assert sorted(os.listdir(tmp_path)) == ["benchmark.json", "ppo_metrics"]
    assert (tmp_path / "ppo_metrics/training_metrics.csv").exists()
    assert set(res["phases_s_median"]) == {"generate", "score", "train"} and set(res["floor_s"]) == {"sample", "score", "train"}
    assert res["step_time_s_median"] > 0 and res["floor_total_s"] > 0 and res["peak_rss_mb"] > 100
    assert res["overhead"] == pytest.approx(res["step_time_s_median"] / res["floor_total_s"], rel=0.01)
