"""The PPO math as pure functions, checked against hand-computed cases and naive loops."""
import copy
import math

import pytest
import torch

import loading
import plumbing
import ppo


def test_masked_mean_and_whiten_ignore_masked_slots():
    x = torch.tensor([[1.0, 2.0, 3.0, float("nan")], [4.0, 5.0, 1e9, 7.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    assert ppo.masked_mean(x, mask).item() == pytest.approx(3.0)  # (1+2+3+4+5)/5
    assert ppo.masked_mean(x, mask, dim=1).tolist() == pytest.approx([2.0, 4.5])
    w = ppo.masked_whiten(x, mask)
    real = w[mask]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert real.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert (w[~mask] == 0).all()
    assert torch.isfinite(w).all()
    # shift_mean=False keeps the mean (reward whitening in OAI)
    w2 = ppo.masked_whiten(x, mask, shift_mean=False)
    assert w2[mask].mean().item() == pytest.approx(3.0, abs=1e-5)


def test_kl_estimators_hand_values():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert ppo.kl_per_token(logp, ref, "k1").item() == pytest.approx(1.0)
    assert ppo.kl_per_token(logp, ref, "k3").item() == pytest.approx(math.exp(-1))
    # k3 is never negative; k1 is negative when the reference likes the token more
    assert ppo.kl_per_token(ref, logp, "k1").item() == pytest.approx(-1.0)
    assert ppo.kl_per_token(ref, logp, "k3").item() == pytest.approx(math.e - 2)
    # INVALID_LOGPROB on both sides gives exactly 0
    inv = torch.tensor([ppo.INVALID_LOGPROB])
    assert ppo.kl_per_token(inv, inv, "k1").item() == 0 and ppo.kl_per_token(inv, inv, "k3").item() == 0
    with pytest.raises(ValueError):
        ppo.kl_per_token(logp, ref, "k2")


def test_kl_estimators_are_unbiased_monte_carlo():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(6), 0)
    q = torch.softmax(torch.randn(6), 0)
    exact = (p * (p.log() - q.log())).sum().item()
    x = torch.multinomial(p, 200000, replacement=True)
    k1 = ppo.kl_per_token(p.log()[x], q.log()[x], "k1")
    k3 = ppo.kl_per_token(p.log()[x], q.log()[x], "k3")
    for k in (k1, k3):
        assert abs(k.mean().item() - exact) < 5 * k.std().item() / math.sqrt(len(x))
    assert k3.std() < k1.std()


def test_truncate_after_eos_and_mask():
    E, P = 9, 0
    sampled = torch.tensor([[1, 2, E, 3, 4], [E, 5, 6, 7, 8], [1, 2, 3, 4, E], [1, 2, 3, 4, 5], [1, E, E, 2, 3]])
    resp, mask = ppo.truncate_after_eos(sampled, E, P)
    assert resp.tolist() == [[1, 2, E, P, P], [E, P, P, P, P], [1, 2, 3, 4, E], [1, 2, 3, 4, 5], [1, E, P, P, P]]
    assert mask.long().tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert loading.last_index(mask).tolist() == [2, 0, 4, 4, 1]


def test_compute_rewards_hand_example():
    logp = torch.tensor([[-1.0, -2.0, -0.5, ppo.INVALID_LOGPROB]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, ppo.INVALID_LOGPROB]])
    mask = torch.tensor([[True, True, True, False]])
    rewards, kl, nsr = ppo.compute_rewards(torch.tensor([2.0]), logp, ref, mask, beta=0.1)
    assert kl[0].tolist() == pytest.approx([0.5, -1.0, 0.0, 0.0])
    assert rewards[0].tolist() == pytest.approx([-0.05, 0.1, 2.0, 0.0])  # score at the last real token (the EOS)
    assert rewards.sum().item() == pytest.approx(2.0 - 0.1 * kl.sum().item())
    assert nsr.sum().item() == pytest.approx(-0.1 * (0.5 - 1.0))


def naive_gae(r, v, gamma, lam):
    """Explicit double sum A_t = Σ_l (γλ)^l δ_{t+l} over one unpadded episode."""
    T = len(r)
    vv = list(v) + [0.0]
    deltas = [r[t] + gamma * vv[t + 1] - vv[t] for t in range(T)]
    return [sum((gamma * lam) ** l * deltas[t + l] for l in range(T - t)) for t in range(T)]


def test_gae_hand_example():
    adv, ret = ppo.compute_gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]),
                               torch.ones(1, 3, dtype=torch.bool), 1.0, 0.95)
    assert adv[0].tolist() == pytest.approx([0.46575, 0.385, 0.3])
    assert ret[0].tolist() == pytest.approx([0.96575, 0.985, 1.0])


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (1.0, 0.0)])
def test_gae_against_naive_loop_with_garbage_after_eos(gamma, lam):
    torch.manual_seed(1)
    lengths = [5, 2, 7, 1]
    r, v = torch.randn(4, 7), torch.randn(4, 7)
    mask = torch.arange(7)[None] < torch.tensor(lengths)[:, None]
    r_g, v_g = r.masked_fill(~mask, 1e6), v.masked_fill(~mask, -1e6)  # garbage in masked slots
    adv, ret = ppo.compute_gae(r_g, v_g, mask, gamma, lam)
    for b, n in enumerate(lengths):
        want = naive_gae(r[b, :n].tolist(), v[b, :n].tolist(), gamma, lam)
        assert adv[b, :n].tolist() == pytest.approx(want, abs=1e-5)
        assert ret[b, :n].tolist() == pytest.approx([a + x for a, x in zip(want, v[b, :n].tolist())], abs=1e-5)
        assert (adv[b, n:] == 0).all()
    if lam == 1.0 and gamma == 1.0:  # Monte-Carlo: return = sum of the remaining rewards
        assert ret[0, 0].item() == pytest.approx(r[0, :5].sum().item(), abs=1e-5)


def test_policy_loss_hand_example_and_gradients():
    ratio = torch.tensor([[1.5, 0.5, 1.0]])
    old = torch.zeros(1, 3)
    new = ratio.log().requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, st = ppo.policy_loss(new, old, adv, mask, 0.2)
    assert loss.item() == pytest.approx(-0.8)
    assert st["clipfrac"].item() == pytest.approx(2 / 3)
    assert st["approxkl"].item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3)
    loss.backward()
    # clipped tokens get no gradient; the unclipped one gets -A·r/n
    assert new.grad[0].tolist() == pytest.approx([0.0, 0.0, -2.0 / 3])


def test_policy_loss_at_ratio_one_and_masking():
    adv = torch.tensor([[1.0, -2.0, 5.0]])
    mask = torch.tensor([[True, True, False]])
    lp = torch.tensor([[-1.0, -2.0, 123.0]])
    loss, st = ppo.policy_loss(lp, torch.tensor([[-1.0, -2.0, -7.0]]), adv, mask)
    assert loss.item() == pytest.approx(-(1.0 - 2.0) / 2)  # -mean(A) over real tokens; the masked slot is ignored
    assert st["clipfrac"].item() == 0 and st["approxkl"].item() == 0 and st["ratio"].item() == pytest.approx(1.0)


def test_value_loss_hand_example():
    v, old, ret = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[2.0, 0.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, cf = ppo.value_loss(v, old, ret, mask, 0.2)
    assert loss.item() == pytest.approx(0.445)
    assert cf.item() == pytest.approx(1.0)
    # inside the clip range it is the plain ½·MSE
    loss2, cf2 = ppo.value_loss(torch.tensor([[0.6, 0.4]]), old, ret, mask, 0.2)
    assert loss2.item() == pytest.approx(0.5 * ((0.6 - 2) ** 2 + 0.4 ** 2) / 2)
    assert cf2.item() == 0


def test_entropy_from_logprobs():
    assert ppo.entropy_from_logprobs(torch.tensor([0.5, 0.25, 0.25]).log()).item() == pytest.approx(1.5 * math.log(2))
    assert ppo.entropy_from_logprobs(torch.log_softmax(torch.zeros(8), 0)).item() == pytest.approx(math.log(8))
    # a token of probability 0 (log p = -inf) adds nothing, not NaN
    assert ppo.entropy_from_logprobs(torch.tensor([0.0, -float("inf")])).item() == 0


def test_adaptive_kl_controller_hand_updates():
    for kl, factor in [(12.0, 1.01024), (3.0, 0.98976), (6.6, 1.00512), (6.0, 1.0)]:
        ctl = ppo.AdaptiveKLController(0.15, 6.0, 10000)
        assert ctl.update(kl, 512) == pytest.approx(0.15 * factor)
    fixed = ppo.AdaptiveKLController(0.15, 6.0, 10000, adaptive=False)
    assert fixed.update(100.0, 512) == 0.15


def test_adaptive_kl_controller_closed_loop_converges_to_target():
    ctl = ppo.AdaptiveKLController(0.5, 6.0, 10000)
    for _ in range(3000):
        ctl.update(0.9 / ctl.value, 512)  # toy plant: KL = 0.9 / β
    assert ctl.value == pytest.approx(0.15, rel=0.01)


def test_running_moments_match_whole_batch():
    torch.manual_seed(0)
    x = torch.randn(100) * 3 + 2
    rm = ppo.RunningMoments()
    for part in x.split([10, 37, 53]):
        rm.update(part)
    assert rm.mean == pytest.approx(x.mean().item(), abs=1e-5)
    assert rm.var == pytest.approx(x.var(unbiased=False).item(), rel=1e-4)


def test_repetition_rate():
    assert ppo.repetition_rate([1, 2, 3, 4, 5]) == 0.0
    assert ppo.repetition_rate([7, 7, 7, 7, 7, 7]) == pytest.approx(0.75)
    assert ppo.repetition_rate([1, 2]) == 0.0


def test_position_ids_ignore_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert loading.position_ids_of(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_params_checksum_sees_one_ulp_and_nothing_else():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.Linear(300, 5))
    b = copy.deepcopy(a)
    assert plumbing.params_checksum([a]) == plumbing.params_checksum([b])
    threads = torch.get_num_threads()
    try:  # the sum is over integers: the reduction order (thread count) cannot change it
        torch.set_num_threads(1)
        assert plumbing.params_checksum([a]) == plumbing.params_checksum([b])
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        w = b[0].weight
        w[3, 7] = torch.nextafter(w[3, 7], torch.tensor(1.0))
    assert plumbing.params_checksum([a]) != plumbing.params_checksum([b])


def test_whitening_keeps_its_precision_when_the_mean_dwarfs_the_spread():
    """Moments in float64 from the start: float32 sums of x² lose a spread of 1e-2 around a mean of 1e3."""
    torch.manual_seed(0)
    x = (1000 + 0.01 * torch.randn(64, 64)).float()
    mask = torch.rand(64, 64) > 0.2
    x64 = x.double()[mask]
    expected = (x64 - x64.mean()) / (x64.var(unbiased=False) + 1e-8).sqrt()
    got = ppo.masked_whiten(x, mask)
    assert got.dtype == torch.float32 and (got[mask].double() - expected).abs().max() < 1e-4
    assert (got[~mask] == 0).all()
