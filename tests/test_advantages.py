"""Critic-free advantages beside GAE: GRPO, RLOO and REINFORCE++ against hand computations, KL in the loss, a prompt's
replies kept together (in the batch and on one process), three roles loaded, exact resume, torchrun."""
import os
import types

import pytest
import torch

import loading
import plumbing
import ppo

from conftest import assert_same_rows, make_config, metrics_rows as rows, torchrun

CPU = torch.device("cpu")


def test_group_estimators_against_hand_computation():
    R = torch.tensor([1.0, 3.0, 2.0, 6.0, 0.0, 0.0])  # groups of n = 2: (1, 3), (2, 6), (0, 0)
    # GRPO: (R - mean) / (std + 1e-4), std unbiased: group (1, 3) has mean 2, std sqrt(2)
    s = 2 ** 0.5
    grpo = ppo.group_advantages(R, 2, "grpo")
    assert grpo.tolist() == pytest.approx([-1 / (s + 1e-4), 1 / (s + 1e-4), -2 / (2 * s + 1e-4), 2 / (2 * s + 1e-4),
                                           0, 0], abs=1e-6)
    assert ppo.group_advantages(R, 2, "grpo", scale_std=False).tolist() == [-1, 1, -2, 2, 0, 0]  # Dr. GRPO
    # RLOO: R - mean of the other n - 1; n = 3: group (1, 3, 2) -> 1 - 2.5, 3 - 1.5, 2 - 2
    R3 = torch.tensor([1.0, 3.0, 2.0, 6.0, 0.0, 0.0])
    assert ppo.group_advantages(R3, 3, "rloo").tolist() == pytest.approx([-1.5, 1.5, 0.0, 6.0, -3.0, -3.0])
    for n in (2, 3, 6):  # a group's baselines sum to 0
        for est in ("grpo", "rloo"):
            assert ppo.group_advantages(R3, n, est).reshape(-1, n).sum(1).abs().max() < 1e-5


def test_compute_advantages_per_estimator():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    rewards = torch.tensor([[-0.1, -0.2, 1.0, 9.0], [0.1, 2.0, 9.0, 9.0], [0.0, 0.0, 0.0, -1.0], [3.0, 9.0, 9.0, 9.0]])
    # GRPO / RLOO: the reply's total reward (masked slots ignored), one advantage on each of its tokens
    totals = torch.tensor([0.7, 2.1, -1.0, 3.0])
    for est in ("grpo", "rloo"):
        adv, ret = ppo.compute_advantages(rewards, None, mask, est, n=2)
        expected = ppo.group_advantages(totals, 2, est)
        assert ret is None and torch.allclose(adv, torch.where(mask, expected[:, None], 0.0), atol=1e-6)
    # REINFORCE++: returns-to-go (γ = 1) of the shaped reward, whitened over all real tokens of the batch
    adv, ret = ppo.compute_advantages(rewards, None, mask, "reinforce++", gamma=1.0)
    togo = [[0.7, 0.8, 1.0], [2.1, 2.0], [-1.0, -1.0, -1.0, -1.0], [3.0]]
    flat = torch.tensor([x for row in togo for x in row])
    whitened = (flat - flat.mean()) / flat.var(unbiased=False).add(1e-8).sqrt()
    assert torch.allclose(adv[mask], whitened, atol=1e-5) and (adv[~mask] == 0).all()


def test_kl_in_the_loss_is_beta_times_k3():
    """With KL_IN = loss the reward holds no KL and the loss adds β·mean k3(π, π_ref); its gradient pulls the
    policy to the reference."""
    torch.manual_seed(0)
    lp_ref = torch.log_softmax(torch.randn(3), 0)
    theta = torch.randn(3, requires_grad=True)
    lp = torch.log_softmax(theta, 0)
    k3 = ppo.kl_per_token(lp, lp_ref, "k3")
    assert torch.allclose(k3, torch.expm1(lp_ref - lp) - (lp_ref - lp)) and (k3 >= 0).all()
    rewards, kl, non_score = ppo.compute_rewards(torch.tensor([2.0]), lp[None].detach(), lp_ref[None],
                                                 torch.ones(1, 3, dtype=torch.bool), 0.0)
    assert rewards.tolist() == [[0.0, 0.0, 2.0]] and (non_score == 0).all() and kl.abs().sum() > 0


def test_kl_in_the_loss_adds_beta_times_k3_on_real_tokens():
    c = make_config(ADVANTAGE="grpo", SAMPLES_PER_PROMPT=2, KL_IN="loss")
    roles = loading.load_roles(c, CPU, torch.float32)
    some = loading.load_prompts(c["PROMPT_FILE"], roles.tok, 128, "PROMPT_FILE", lambda *a: None)[:2]
    batch = ppo.rollout(roles, [some[0], some[0], some[1], some[1]], 0.5, c)
    assert batch["values"] is None and (batch["non_score_reward"] == 0).all()
    head = roles.actor.get_output_embeddings().weight
    with torch.no_grad():  # move the policy away from the reference, so that the KL term is not 0
        head.add_(0.05 * torch.randn_like(head))
    batch["advantages"] = torch.zeros_like(batch["advantages"])  # the loss is then beta * KL term alone
    ctx, mask = batch["context_length"], batch["mask"]
    stats = ppo.micro_batch_backward(roles.actor, None, batch, torch.arange(4), ctx, c, accum=1)
    with torch.no_grad():
        lp = ppo.response_logprobs(roles.actor, batch["query_responses"], batch["attention_mask"], ctx, 1.0)
    k3 = torch.expm1(batch["ref_logprobs"] - lp) - (batch["ref_logprobs"] - lp)
    kl_term = stats["loss/kl_avg"]
    assert kl_term.item() == pytest.approx(k3[mask].mean().item(), rel=1e-4) and kl_term > 0
    assert "loss/value_avg" not in stats and "val/clipfrac_avg" not in stats  # no critic: no value loss
    grads = [p.grad for p in roles.actor.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def fake_run(n, world, rank, mb=4):
    c = make_config(MINI_BATCH_SIZE=mb, GRAD_ACCUM=world, PPO_BUFFER_SIZE=1, SAMPLES_PER_PROMPT=n)
    run = types.SimpleNamespace(sizes=ppo.batch_sizes(c, world), rank=rank, state=plumbing.RunState({}, 0.1),
                                prompts=[loading.Prompt(f"p{i}", None, [i]) for i in range(40)],
                                prompt_rng=torch.Generator().manual_seed(0))
    run.next = lambda: plumbing.next_prompts(run.state, run.prompts, run.sizes, run.rank, run.prompt_rng)
    return run


def test_a_prompts_replies_stay_together_and_on_one_process():
    shares = []
    for rank in (0, 1):
        run = fake_run(n=4, world=2, rank=rank)
        got = [p[0] for p in run.next()]
        assert len(got) == run.sizes.per_rank == 4  # 4 replies per process: one prompt, 4 times in a row
        assert [got[i] for i in range(0, 4, 4) for _ in range(4)] == got
        shares.append(set(got))
    assert not shares[0] & shares[1]  # a prompt's group is on one process, never split
    run = fake_run(n=2, world=1, rank=0, mb=8)
    a, b = run.next(), run.next()
    assert [p[0] for p in a[::2]] == [p[0] for p in a[1::2]] and len({p[0] for p in a + b}) == 8
    with pytest.raises(loading.ConfigError, match="SAMPLES_PER_PROMPT = 3 does not divide the 4 replies per process"):
        ppo.batch_sizes(make_config(MINI_BATCH_SIZE=4, SAMPLES_PER_PROMPT=3), 1)
    with pytest.raises(loading.ConfigError, match="too few for ADVANTAGE = 'grpo'"):
        ppo.train(make_config(ADVANTAGE="grpo", SAMPLES_PER_PROMPT=1))


@pytest.mark.parametrize("adv,n,kl_in,lora", [("grpo", 2, "loss", 0), ("rloo", 4, "reward", 0),
                                               ("reinforce++", 1, "reward", 0), ("grpo", 4, "reward", 8)])
def test_two_critic_free_steps_load_three_roles_and_log_no_value_metrics(adv, n, kl_in, lora, tmp_path, capsys):
    # one case with a plain entropy bonus (no floor): the start says what it risks; the others have the floored default
    entropy = dict(ENTROPY_COEF=0.01, ENTROPY_FLOOR=0.0) if adv == "reinforce++" else {}
    s = ppo.train(make_config(tmp_path, TOTAL_STEPS=2, EVAL_SIZE=4, ADVANTAGE=adv, SAMPLES_PER_PROMPT=n, KL_IN=kl_in,
                              LORA_R=lora, SAVE_MODEL=True, **entropy))
    assert ("made grpo diverge" in capsys.readouterr().out) == bool(entropy)
    assert s["models"]["roles_loaded"] == ["actor", "reference", "reward"] and s["models"]["critic"] is None
    assert s["derived"]["PROMPTS_PER_STEP"] == 4 // n
    out = rows(tmp_path)
    assert len(out) == 2 and abs(float(out[0]["objective/kl"])) < 1e-4
    assert not any(k.startswith("val/") and k != "val/ratio" or k == "loss/value_avg" for k in out[0])
    assert ("loss/kl_avg" in out[0]) == (kl_in == "loss")
    if kl_in == "loss":
        assert float(out[0]["objective/non_score_reward"]) == 0 and float(out[1]["loss/kl_avg"]) >= 0
    assert sorted(os.listdir(tmp_path / "ppo_model")) == (["actor", "actor_adapter"] if lora else ["actor"])


def test_critic_free_resume_is_exact(tmp_path):
    kw = dict(EVAL_FILE="", ADVANTAGE="grpo", SAMPLES_PER_PROMPT=2, KL_IN="loss")
    ppo.train(make_config(tmp_path / "a", TOTAL_STEPS=4, **kw))
    ppo.train(make_config(tmp_path / "b", TOTAL_STEPS=2, **kw))
    ppo.train(make_config(tmp_path / "b", TOTAL_STEPS=4, **kw))
    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert len(a) == len(b) == 4
    assert_same_rows(a, b)


def test_torchrun_grpo_keeps_groups_on_one_process(tmp_path):
    r = torchrun(["--mini_batch_size=4", "--eval_size=4", "--advantage=grpo", "--samples_per_prompt=4",
                  "--save_model=false"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = rows(tmp_path)
    assert len(out) == 2 and all(float(x["dist/ranks_in_sync"]) == 1.0 for x in out)
    assert int(out[-1]["episodes"]) == 16  # 2 steps x 8 replies: 2 prompts x 4, one prompt per process
    assert "rollout batch 8 replies (2 prompts x 4) per PPO step (4 per process)" in r.stdout
