"""Step-0 invariants of the PPO loop on the committed demo models (implementation details, 'step-0 suite')."""
import copy
from types import SimpleNamespace

import pytest
import torch

import loading
import ppo

from conftest import make_config, roles_of

CPU = torch.device("cpu")


def small_config(**kw):
    return make_config(**dict(dict(GRAD_ACCUM=2, PPO_BUFFER_SIZE=2, MAX_NEW_TOKENS=24), **kw))


@pytest.fixture(scope="module")
def world():
    c = small_config()
    tok, _ = loading.load_tokenizer(c["ACTOR_MODEL"], "ACTOR_MODEL")
    actor = loading.load_model("causal", c["ACTOR_MODEL"], "ACTOR_MODEL", CPU, torch.float32)
    ref = loading.freeze(loading.load_model("causal", c["ACTOR_MODEL"], "REF_MODEL", CPU, torch.float32))
    rm = loading.freeze(loading.load_model("score", c["REWARD_MODEL"], "REWARD_MODEL", CPU, torch.float32))
    critic = loading.load_model("score", c["REWARD_MODEL"], "CRITIC_MODEL", CPU, torch.float32)
    scorer = loading.RewardScorer(rm, tok, tok, CPU)
    prompts = loading.load_prompts(c["PROMPT_FILE"], tok, 128, "PROMPT_FILE")
    return c, tok, actor, ref, rm, critic, scorer, prompts


def test_step0_invariants(world):
    c, tok, actor, ref, rm, critic, scorer, prompts = world
    actor, critic = copy.deepcopy(actor), copy.deepcopy(critic)
    torch.manual_seed(0)
    B = 16
    batch = ppo.rollout(roles_of(tok, actor, ref, critic, scorer, [tok.eos_token_id]), prompts[:B], 0.2, c)
    mask = batch["mask"]
    # policy == reference => every per-token KL is 0 (the old logprobs come from the KV-cache sampler, the reference's
    # from a full forward: equal up to fp32 rounding), rewards are the score alone, at the last real token
    assert batch["kl"].abs().max().item() <= 1e-5
    assert torch.allclose(batch["rewards"].sum(1), batch["scores"], atol=1e-4)
    last = loading.last_index(mask)
    assert torch.allclose(batch["rewards"][torch.arange(B), last], batch["scores"], atol=1e-5)
    # masked slots carry INVALID_LOGPROB; advantages are 0 there and whitened over real tokens
    assert (batch["logprobs"][~mask] == ppo.INVALID_LOGPROB).all()
    adv = batch["advantages"]
    assert (adv[~mask] == 0).all()
    assert adv[mask].mean().abs().item() < 1e-5 and abs(adv[mask].var(unbiased=False).item() - 1) < 1e-4
    raw, returns = ppo.compute_gae(batch["rewards"], batch["values"], mask, c["GAMMA"], c["LAM"])
    assert torch.allclose(batch["returns"], returns) and torch.allclose(returns[mask], (raw + batch["values"])[mask])
    # the critic starts as the reward model: its value at the EOS equals the RM score read there
    # (V_t is the value of the state *before* token t, so compare on the state that includes the last token)
    full = critic(batch["query_responses"], batch["attention_mask"],
                            loading.last_index(batch["attention_mask"]))
    assert torch.allclose(full, batch["raw_scores"], atol=1e-5)

    old_logprobs, old_values = batch["logprobs"].clone(), batch["values"].clone()
    ref_before = [p.clone() for p in ref.parameters()]
    actor_before = [p.clone() for p in actor.parameters()]
    params = list(actor.parameters()) + list(critic.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, eps=1e-5)
    stats = ppo.ppo_update(ppo.Trainer(actor, critic, params, opt, None), batch, c)
    # first micro-batch, before any optimizer step: ratio 1, no clipping, approx KL 0
    assert stats[0]["val/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert stats[0]["policy/clipfrac_avg"] == 0 and stats[0]["policy/approxkl_avg"] < 1e-8
    # ppo_epochs x minibatches optimizer steps; every micro-batch of every step seen
    assert sum("policy/grad_norm" in s for s in stats) == c["PPO_EPOCHS"] * c["PPO_BUFFER_SIZE"]
    assert len(stats) == c["PPO_EPOCHS"] * c["PPO_BUFFER_SIZE"] * c["GRAD_ACCUM"]
    # the update moved the actor, left the rollout tensors and the frozen models alone
    assert not all(torch.equal(a, b) for a, b in zip(actor_before, actor.parameters()))
    assert stats[-1]["policy/approxkl_avg"] > 0
    assert torch.equal(batch["logprobs"], old_logprobs) and torch.equal(batch["values"], old_values)
    assert all(p.grad is None for p in ref.parameters()) and all(p.grad is None for p in rm.parameters())
    assert all(torch.equal(a, b) for a, b in zip(ref_before, ref.parameters()))
    assert batch["advantages"].grad_fn is None and batch["rewards"].grad_fn is None


def test_gradient_clipping_bounds_the_joint_update(world):
    c, tok, actor, ref, rm, critic, scorer, prompts = world
    torch.manual_seed(0)
    batch = ppo.rollout(roles_of(tok, actor, ref, critic, scorer, [tok.eos_token_id]), prompts[:4], 0.2, c)
    one_step = dict(MINI_BATCH_SIZE=4, GRAD_ACCUM=1, PPO_BUFFER_SIZE=1, PPO_EPOCHS=1)
    for max_norm in (1e-3, 0.0, 1e6):  # clipped; off; above the norm (no change to the gradient)
        a, v = copy.deepcopy(actor), copy.deepcopy(critic)
        params = list(a.parameters()) + list(v.parameters())
        before = [p.detach().clone() for p in params]
        sgd = torch.optim.SGD(params, lr=1.0)  # the update is minus the (clipped) gradient itself
        stats = ppo.ppo_update(ppo.Trainer(a, v, params, sgd, None), batch, small_config(**one_step, MAX_GRAD_NORM=max_norm))
        step = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)]).norm().item()
        grad_norm = stats[-1]["policy/grad_norm"]  # reported before clipping
        assert grad_norm > 1e-2
        expected = min(grad_norm, max_norm) if max_norm else grad_norm
        assert step == pytest.approx(expected, rel=1e-3), (max_norm, step, grad_norm)


def test_logprobs_values_and_scores_do_not_depend_on_batch_padding(world):
    c, tok, actor, ref, rm, critic, scorer, prompts = world
    # one short prompt alone, then beside a much longer one (more left padding), with the same reply
    short = min(prompts, key=lambda p: len(p[2]))
    long_ = max(prompts, key=lambda p: len(p[2]))
    reply = tok("The lamp is great and sturdy.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    def measure(rows):
        q, qm = loading.left_pad([r[2] for r in rows], tok.pad_token_id, CPU)
        resp = torch.full((len(rows), len(reply) + 3), tok.pad_token_id)
        resp[:, :len(reply)] = torch.tensor(reply)
        resp, m = ppo.truncate_after_eos(resp, tok.eos_token_id, tok.pad_token_id)
        qr, am = torch.cat([q, resp], 1), torch.cat([qm, m], 1)
        with torch.no_grad():
            lp = ppo.response_logprobs(actor, qr, am, q.shape[1], 0.7)[0, :len(reply)]
            v = ppo.critic_values(critic, qr, am, q.shape[1])[0, :len(reply)]
        s = scorer(qr, am, q.shape[1], None, None, None)[0]
        return lp, v, s

    alone, padded = measure([short]), measure([short, long_])
    assert len(long_[2]) > len(short[2]) + 5
    for a, b in zip(alone, padded):
        assert torch.allclose(a, b, atol=1e-4)
    # without position ids the padded row would differ (GPT-2 has absolute positions): the test can fail
    q, qm = loading.left_pad([short[2], long_[2]], tok.pad_token_id, CPU)
    with torch.no_grad():
        bad = actor(input_ids=q, attention_mask=qm).logits[0, -1]
        good = actor(input_ids=q, attention_mask=qm, position_ids=loading.position_ids_of(qm)).logits[0, -1]
    assert not torch.allclose(bad, good, atol=1e-3)


def test_sampler_logprobs_equal_rescoring_with_temperature_and_offset(world):
    c, tok, actor, ref, rm, critic, scorer, prompts = world
    # the rollout's old logprobs come from the sampler: on a left-padded batch at T = 0.7 they must equal the
    # re-scored log_softmax(logits / T) at the token's own position (implementation details #2, #4, #5, #6)
    rows = sorted(prompts[:40], key=lambda p: len(p[2]))[::5]  # prompts of different lengths: real left padding
    q, qm = loading.left_pad([r[2] for r in rows], tok.pad_token_id, CPU)
    torch.manual_seed(0)
    sampled, sampler_lp = ppo.sample_responses(actor, q, qm, 24, 0.7, tok.eos_token_id, tok.pad_token_id)
    resp, m = ppo.truncate_after_eos(sampled, tok.eos_token_id, tok.pad_token_id)
    qr, am = torch.cat([q, resp], 1), torch.cat([qm, m], 1)
    assert m.sum(1).min() < m.shape[1] and (qm.sum(1) < qm.shape[1]).any()  # ragged replies and prompts
    with torch.no_grad():
        rescored = ppo.response_logprobs(actor, qr, am, q.shape[1], 0.7)
        unscaled = ppo.response_logprobs(actor, qr, am, q.shape[1], 1.0)
    assert (sampler_lp - rescored)[m].abs().max().item() < 1e-5
    assert (sampler_lp - unscaled)[m].abs().max().item() > 0.1  # the temperature matters: the test can fail


def test_sampler_draws_from_the_temperature_scaled_policy(world):
    c, tok, actor, ref, rm, critic, scorer, prompts = world
    # many copies of one prompt: the empirical first-token distribution matches softmax(logits / T)
    q, qm = loading.left_pad([prompts[0][2]] * 4000, tok.pad_token_id, CPU)
    torch.manual_seed(0)
    first = ppo.sample_responses(actor, q, qm, 1, 0.7, tok.eos_token_id, tok.pad_token_id)[0][:, 0]
    with torch.no_grad():
        p = torch.softmax(actor(input_ids=q[:1], attention_mask=qm[:1]).logits[0, -1] / 0.7, -1)
    emp = torch.bincount(first, minlength=len(p)).float() / len(first)
    assert (emp - p).abs().max().item() < 0.03
    top = p.argmax()
    assert abs(emp[top].item() - p[top].item()) < 4 * (p[top].item() * (1 - p[top].item()) / 4000) ** 0.5 + 1e-3


def test_sampler_never_draws_a_zero_probability_token():
    # logits with -inf entries, the last vocabulary entry among them (the edge of the inverse-CDF draw)
    logits = torch.tensor([0.0, -float("inf"), 1.0, 0.5, -float("inf")])

    class FixedLM:  # a stand-in causal LM: the same next-token logits at every position
        def __call__(self, input_ids, **kw):
            return SimpleNamespace(logits=logits.expand(len(input_ids), 1, -1), cache=None)
    n = 20000
    q, qm = torch.ones(n, 3, dtype=torch.long), torch.ones(n, 3, dtype=torch.bool)
    torch.manual_seed(0)
    tokens, logp = ppo.sample_responses(FixedLM(), q, qm, 1, 1.0, stop_ids=[99], pad_id=0)
    counts = torch.bincount(tokens[:, 0], minlength=5).float() / n
    assert counts[1] == 0 and counts[4] == 0
    p = torch.softmax(logits, 0)
    assert (counts - p).abs().max().item() < 0.015
    assert torch.allclose(logp[:, 0], p.log()[tokens[:, 0]])


def test_dropout_is_disabled_in_every_role(world):
    c, tok, actor, ref, rm, critic, scorer, prompts = world
    for m in (actor, ref, rm, critic):
        assert all(d.p == 0 for d in m.modules() if isinstance(d, torch.nn.Dropout))
        assert not m.training
    assert not any(p.requires_grad for p in ref.parameters()) and not any(p.requires_grad for p in rm.parameters())


def test_replies_end_at_any_of_the_stop_tokens(world):
    """Sampling, truncation, masks and `ended` all use the whole stop set: here EOS and '.', so most replies end at
    their first full stop (chat models end turns with tokens other than the tokenizer's EOS)."""
    c, tok, actor, ref, rm, critic, scorer, prompts = world
    period = tok.convert_tokens_to_ids(".")
    stops = [tok.eos_token_id, period]
    torch.manual_seed(0)
    batch = ppo.rollout(roles_of(tok, actor, ref, critic, scorer, stops), prompts[:16], 0.2, c)
    resp, mask, ended = batch["responses"], batch["mask"], batch["ended"]
    last = resp[torch.arange(len(resp)), loading.last_index(mask)]
    assert torch.equal(ended, torch.isin(last, torch.tensor(stops)))  # ended <=> the last real token is a stop token
    assert ((ppo.is_stop(resp, stops) & mask).sum(1) <= 1).all()     # nothing is kept after the first one
    assert (last == period).sum() >= 8 and ended.all()               # the extra stop token really ends replies
    assert all(r.count(".") <= 1 for r in batch["replies"])


def test_gradient_accumulation_all_reduces_once_per_optimizer_step(world):
    """Under DDP the gradient all-reduce runs in the last micro-batch of each optimizer step only (no_sync on the
    others): counted with a comm hook on a one-process gloo group."""
    c, tok, actor, ref, rm, critic, scorer, prompts = world
    torch.manual_seed(0)
    batch = ppo.rollout(roles_of(tok, actor, ref, critic, scorer, [tok.eos_token_id]), prompts[:4], 0.2, c)
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        def reductions(grad_accum):
            calls = []

            def count(state, bucket):
                calls.append(1)
                fut = torch.futures.Future()
                fut.set_result(bucket.buffer())
                return fut
            a, v = (torch.nn.parallel.DistributedDataParallel(copy.deepcopy(m)) for m in (actor, critic))
            a.register_comm_hook(None, count), v.register_comm_hook(None, count)
            params = list(a.parameters()) + list(v.parameters())
            cfg = small_config(MINI_BATCH_SIZE=4 // grad_accum, GRAD_ACCUM=grad_accum, PPO_BUFFER_SIZE=1, PPO_EPOCHS=1)
            stats = ppo.ppo_update(ppo.Trainer(a, v, params, torch.optim.SGD(params, lr=0.0), None), batch, cfg)
            assert len(stats) == grad_accum
            return len(calls)
        one, two = reductions(1), reductions(2)
        assert one > 0 and two == one  # two micro-batches, one all-reduce of every bucket
    finally:
        torch.distributed.destroy_process_group()
