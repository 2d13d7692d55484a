"""One PPO step with real numbers (worked_example.md and summary.json), and diversity across held-out replies."""
import json
import math

import numpy as np
import pytest

import plumbing
import ppo

from conftest import make_config, metrics_rows as rows


def gae_by_hand(r, v, gamma, lam):
    deltas = [r[t] + gamma * (v[t + 1] if t + 1 < len(r) else 0.0) - v[t] for t in range(len(r))]
    adv, a = [], 0.0
    for d in reversed(deltas):
        a = d + gamma * lam * a
        adv.append(a)
    return deltas, adv[::-1]


def test_the_worked_example_recomputes_from_its_own_numbers(tmp_path):
    s = ppo.train(make_config(tmp_path, TOTAL_STEPS=3, EVAL_SIZE=4, LAM=0.9, GAMMA=0.99))
    assert set(s["worked_example"]) == {"first", "last"}
    for which, step in (("first", 1), ("last", 3)):
        ex = s["worked_example"][which]
        T = len(ex["tokens"])
        assert ex["step"] == step and T == len(ex["rewards"]) == len(ex["values"]) == len(ex["ratio"]) > 0
        deltas, adv = gae_by_hand(ex["rewards"], ex["values"], ex["gamma"], ex["lam"])
        assert ex["deltas"] == pytest.approx(deltas, abs=1e-5) and ex["advantages_raw"] == pytest.approx(adv, abs=1e-5)
        assert ex["returns"] == pytest.approx([a + v for a, v in zip(adv, ex["values"])], abs=1e-5)
        # r_t = -β·KL_t on every token, plus the score on the last one
        kl_part = [-ex["beta"] * k for k in ex["kl"]]
        assert ex["rewards"][:-1] == pytest.approx(kl_part[:-1], abs=1e-6)
        assert ex["rewards"][-1] == pytest.approx(kl_part[-1] + ex["score"], abs=1e-5)
        assert ex["kl"] == pytest.approx([a - b for a, b in zip(ex["logprobs"], ex["ref_logprobs"])], abs=1e-5)
        # the clip is active where the ratio left the trust region in the advantage's direction
        assert ex["clipped"] == [(r > 1.2) if a > 0 else (r < 0.8) for r, a in zip(ex["ratio"], ex["advantages"])]
        assert math.isclose(sum(ex["logprobs"]), ex["logprob_before"], abs_tol=1e-4)
    md = open(tmp_path / "ppo_metrics/worked_example.md").read()
    assert "## Step 1 (first)" in md and "## Step 3 (last)" in md and "the critic expected" in md
    assert md.count("\n| ") >= 2 * len(s["worked_example"]["last"]["tokens"])  # a row per token
    assert json.load(open(tmp_path / "ppo_metrics/summary.json"))["worked_example"] == s["worked_example"]


def test_a_critic_free_worked_example_shows_the_group(tmp_path):
    s = ppo.train(make_config(tmp_path, TOTAL_STEPS=1, EVAL_FILE="", ADVANTAGE="rloo", SAMPLES_PER_PROMPT=4))
    ex = s["worked_example"]["first"]
    assert "values" not in ex and "deltas" not in ex and len(ex["group"]) == 4
    rewards = [g["reward"] for g in ex["group"]]
    for k, g in enumerate(ex["group"]):  # RLOO: the baseline is the mean of the other replies' rewards
        assert g["baseline"] == pytest.approx((sum(rewards) - rewards[k]) / 3, abs=1e-5)
        assert g["advantage"] == pytest.approx(g["reward"] - g["baseline"], abs=1e-5)
    shown = [g for g in ex["group"] if g["shown"]]
    assert len(shown) == 1 and ex["advantages"] == pytest.approx([shown[0]["advantage"]] * len(ex["tokens"]))


def test_diversity_by_hand():
    d = plumbing.diversity([[1, 2, 3], [1, 2, 4]])
    assert d["distinct_1"] == pytest.approx(4 / 6) and d["distinct_2"] == pytest.approx(3 / 4)
    p = np.array([2, 1, 1]) / 4  # bigrams (1,2) twice, (2,3) and (2,4) once
    assert d["ent_2"] == pytest.approx(float(-(p * np.log(p)).sum()))
    same = plumbing.diversity([[5, 6, 7]] * 10)  # one template for every prompt
    assert same["distinct_2"] == pytest.approx(2 / 20)


def test_held_out_diversity_is_logged_and_a_template_policy_is_caught(tmp_path, capsys):
    ppo.train(make_config(tmp_path, TOTAL_STEPS=2, EVAL_SIZE=8, EVAL_EVERY=1))
    got = rows(tmp_path)
    h1 = float(got[0]["policy/entropy_avg"])  # the default entropy bonus's floor: 0.85 x step 1's entropy, said
    assert f"holds the entropy at >= {0.85 * h1:.3f} nats/token (ENTROPY_FLOOR = 0.85 x step 1's {h1:.3f})" in \
        capsys.readouterr().out
    assert plumbing.entropy_floor([{"policy/entropy_avg": math.nan}, {"policy/entropy_avg": h1}], make_config()) \
        == pytest.approx(0.85 * h1)  # a step that measured nothing is skipped
    assert plumbing.entropy_floor([], make_config()) == 0  # no floor before step 1, nor without the bonus:
    assert plumbing.entropy_floor([{"policy/entropy_avg": h1}], make_config(ENTROPY_COEF=0)) == 0
    assert all(0 < float(r["eval/distinct_2"]) <= 1 and float(r["eval/ent_2"]) > 0 for r in got[:1])
    before, after = {"distinct_2": 0.207, "ent_2": 6.1}, {"distinct_2": 0.101, "ent_2": 4.0}
    verdict = plumbing.diversity_verdict(before, after, make_config())
    assert verdict[0].startswith("WARNING: held-out distinct-2 0.207 -> 0.101 (0.49 x the starting policy's)")
    assert "hold the entropy higher (ENTROPY_FLOOR = 0.85 closer to 1" in verdict[0]
    assert "turn the entropy bonus on" in plumbing.diversity_verdict(before, after, make_config(ENTROPY_COEF=0))[0]
    assert "give the entropy bonus a floor" in plumbing.diversity_verdict(before, after,
                                                                          make_config(ENTROPY_FLOOR=0))[0]
    assert plumbing.diversity_verdict(before, {"distinct_2": 0.19, "ent_2": 6.0}, make_config())[0].startswith("OK")
