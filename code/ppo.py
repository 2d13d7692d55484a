"""PPO for RLHF in one file: Actor, Reference, Reward and Critic, from rollout to clipped update.

    python code/ppo.py                              # the offline demo: ~1.5 min on 2 CPU cores
    python code/ppo.py --total_steps=50 --temperature=0.7
    python code/ppo.py --help                       # every constant below, with its comment

One PPO step (ppo_step) = 1 rollout (sample replies to a batch of prompts, with the actor's logprobs) · 2 truncate
at EOS + masks · 3 reference logprobs, critic values · 4 reward-model scores · 5 per-token KL-penalised rewards ·
6 GAE advantages (or, without a critic, a baseline from the other replies: ADVANTAGE) · 7 PPO epochs of clipped
policy + value updates over minibatches · 8 log, adapt the KL coefficient β. The file reads in that order: the
config, the PPO core (math, the four roles, steps 1-8, evaluation), the loop (train), and below a divider the
plumbing (run setup and resume, checkpoints and interrupts, reporting, command line, distributed helpers).

Everything the run writes goes under OUTPUT_DIR, read in this order:
    ppo_metrics/summary.json          the run at a glance: before/after evaluation, health verdicts, timings
    ppo_metrics/training_curves.png   reward, KL against its target, β, losses, clipfrac, entropy, lengths
    ppo_metrics/training_metrics.csv  one row per PPO step (TRL's metric names where TRL has one; METRICS below)
    ppo_metrics/config.json, samples.jsonl,  ppo_model/actor, ppo_model/critic,  checkpoints/ (resume)
README.md explains the outputs, settings and errors; docs/ppo-implementation-details.md is the checklist that the
comments cite as "implementation details #k"; tests/ holds the tests of each detail.
"""
import contextlib
import csv
import dataclasses
import difflib
import importlib.util
import inspect
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import sys
import time
import warnings

import matplotlib
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

matplotlib.use("Agg")  # write PNGs without a display
import matplotlib.pyplot as plt  # noqa: E402

# ---- config (edit me, or override any constant as --name=value) -----------------------------------------------------
# models: the four roles
ACTOR_MODEL = "data/models/demo-sft"     # Actor (policy, trained): SFT causal LM, local path or hub name
REF_MODEL = ""                           # Reference (frozen SFT copy for the KL leash); "" = ACTOR_MODEL
REWARD_MODEL = "data/models/demo-rm"     # Reward model (frozen judge): any sequence-classification model, or a .py reward function
REWARD_FN = ""                           # a .py file whose score(prompts, responses) is added to the reward (e.g. a format rule)
REWARD_LABEL = ""                        # the reward model's output to use when it has several: index or label name
CRITIC_MODEL = ""                        # Critic (value model, trained; its score head is the value head); "" = REWARD_MODEL
# data
PROMPT_FILE = "data/ppo_prompts.json"    # JSON, JSONL or Parquet: Alpaca, chat messages, ShareGPT or prompt records; outputs never trained on
MAX_PROMPT_TOKENS = 128                  # longer prompts are dropped, with a warning (7B: 512-1024)
# generation
MAX_NEW_TOKENS = 48                      # reply length limit in tokens (7B: 256-512)
TEMPERATURE = 1.0                        # sampling temperature, also applied to every logprob (7B: 0.7-1.0)
MISSING_EOS_PENALTY = 0.0                # subtracted from the score of a reply cut off without EOS (0 = off; TRL's meaning)
STOP_TOKENS = ""                         # tokens that end a reply, comma-separated; "" = generation_config EOS ids + tokenizer EOS
# PPO
TOTAL_STEPS = 250                        # PPO steps = rollout batches (7B: a few hundred to a few thousand)
MINI_BATCH_SIZE = 8                      # sequences per forward/backward (per process)
GRAD_ACCUM = 1                           # micro-batches per optimizer step
PPO_BUFFER_SIZE = 2                      # optimizer steps per PPO epoch; rollout batch (replies) = MINI_BATCH_SIZE*GRAD_ACCUM*this (7B: 1)
PPO_EPOCHS = 4                           # passes over each rollout batch (7B: 4)
PPO_TARGET = 6.0                         # KL target of the adaptive controller, nats per reply (7B: 6.0)
ADAPTIVE_KL = True                       # adapt β towards PPO_TARGET (Ziegler et al. 2019); False keeps β = INIT_KL_COEF
INIT_KL_COEF = 0.1                       # initial β, the KL coefficient (TRL-old 0.2, OAI 0.15, N+ and TRL-new 0.05 fixed)
KL_HORIZON = 1000                        # controller horizon in episodes; smaller adapts faster (7B: 10000, OAI's value)
KL_ESTIMATOR = "k1"                      # per-token KL in the reward: "k1" = logp - logp_ref (unbiased), "k3" = (r-1) - log r
ADVANTAGE = "gae"                        # "gae": the Critic's baseline (4 roles); critic-free (3 roles): "grpo", "rloo", "reinforce++"
SAMPLES_PER_PROMPT = 1                   # replies sampled per prompt, kept together (grpo and rloo need >= 2)
GRPO_STD = True                          # grpo: divide by the group's std (False: Dr. GRPO, the mean only)
KL_IN = "reward"                         # where β·KL goes: "reward" (a per-token penalty, OAI) or "loss" (a k3 loss term, GRPO)
GAMMA = 1.0                              # discount in GAE
LAM = 0.95                               # GAE λ
CLIP_RANGE = 0.2                         # ε of the clipped surrogate objective
CLIP_RANGE_VALUE = 0.2                   # clip of the value update around the rollout values (reward units)
VF_COEF = 0.1                            # weight of the value loss in the joint loss
SCORE_NORM = False                       # whiten RM scores with running mean/std before use (PPO-max)
SCORE_CLIP = 0.0                         # clip scores to ±this after normalisation (0 = off; PPO-max 10)
# optimisation
LEARNING_RATE = 3e-5                     # AdamW, actor and critic (7B: 1e-6)
LR_SCHEDULE = "constant"                 # "constant", "linear" or "cosine" decay to 0 over the run's optimizer steps
WARMUP_STEPS = 0                         # optimizer steps of linear warm-up from 0 before the schedule
ADAM_EPS = 1e-5                          # AdamW ε (N+ and OAI use 1e-5; PyTorch default 1e-8)
WEIGHT_DECAY = 0.0                       # AdamW weight decay
MAX_GRAD_NORM = 1.0                      # clip the joint gradient norm of actor + critic (0 = off)
MAX_BAD_STEPS = 3                        # stop after this many steps in a row with a non-finite score, loss or gradient
SEED = 0                                 # seeds python, numpy and torch: a CPU run is repeatable
DEVICE = "auto"                          # "auto" = cuda, then mps, then cpu; or "cpu", "cuda", "cuda:1", "mps"
DTYPE = "auto"                           # "auto" = bfloat16 on a GPU that supports it, float32 elsewhere; or "float32"
GRADIENT_CHECKPOINTING = False           # recompute activations in the backward of actor and critic: less memory, one more forward
OFFLOAD_FROZEN = False                   # keep reference and reward model on the CPU between uses (frees GPU memory)
DISTRIBUTED = "ddp"                      # under torchrun: "ddp" (a copy per GPU) or "fsdp" (FSDP2: shard actor and critic)
# LoRA (needs peft): train low-rank adapters; the Reference and Reward model then share the trained models' weights
LORA_R = 0                               # adapter rank; 0 = off: full fine-tuning of every weight (7B on one GPU: 16-64)
LORA_ALPHA = 32                          # adapter scale: a layer's update is B·A·LORA_ALPHA/LORA_R
LORA_TARGET_MODULES = "all-linear"       # layers given adapters: "all-linear" (every linear but the output head) or names, comma-separated
# evaluation
EVAL_FILE = "data/ppo_eval.json"         # held-out prompts, same format; "" = no evaluation
EVAL_EVERY = 50                          # evaluate every this many steps (and before and after training; 0 = only those)
EVAL_SIZE = 200                          # held-out prompts used (0 = all)
GOLD_REWARD = "data/demo_gold_reward.py" # file with score(prompts, responses) -> list[float]; measured, never trained on
# output
OUTPUT_DIR = "output"                    # ppo_metrics/ and ppo_model/ go here
SAMPLE_EVERY = 25                        # write a few rollout samples to samples.jsonl every this many steps
REPORT_TO = "none"                       # also log to "tensorboard", "wandb" or "tensorboard,wandb" (rank 0; CSV as always)
SAVE_MODEL = True                        # save the final actor and critic to OUTPUT_DIR/ppo_model/
SAVE_EVERY = 50                          # checkpoint (models, optimizer, RNG, data position, metrics) every this many steps
KEEP_CHECKPOINTS = 2                     # newest checkpoints kept in OUTPUT_DIR/checkpoints/
RESUME = "auto"                          # "auto" = continue from the newest checkpoint of the same config; "never"; or a path

CONFIG_KEYS = [k for k in list(globals()) if k.isupper() and not k.startswith("_")]
INVALID_LOGPROB = 1.0  # stored at masked (post-EOS) slots of both logprob tensors, so every KL estimator gives 0 there (N+)
# The trainer's own padding id: never a real token (OAI pads with an id beyond the vocabulary; N+ adds a [PAD] token
# without resizing the embeddings), never embedded (model_inputs maps masked slots to 0), never written into a saved
# tokenizer or config. Every mask is carried explicitly, so no mask is ever derived from `ids != PAD`.
PAD_ID = -1


class ConfigError(Exception):
    """An expected mistake in the user's input: reported as one line, exit code 2, no traceback."""


class TrainingDiverged(Exception):
    """MAX_BAD_STEPS steps in a row with non-finite numbers: reported as one line, exit code 3."""


# settings that may change when a run is resumed: how long it runs and how it reports, not what it computes
RESUMABLE_CHANGES = {"TOTAL_STEPS", "RESUME", "SAVE_EVERY", "KEEP_CHECKPOINTS", "EVAL_EVERY", "EVAL_FILE", "EVAL_SIZE",
                     "SAMPLE_EVERY", "OUTPUT_DIR", "SAVE_MODEL", "MAX_BAD_STEPS", "DEVICE", "REPORT_TO"}


# ---- references: the shorthands the comments use --------------------------------------------------------------------
# OAI         Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", arXiv:1909.08593, and its
#             code, github.com/openai/lm-human-preferences
# N           Huang et al. 2023, "The N Implementation Details of RLHF with PPO",
#             huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo
# N+          Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR Summarization",
#             arXiv:2403.17031, and github.com/vwxyzjn/summarize_from_feedback_details
# TRL-old     TRL <= 0.11 PPOTrainer (github.com/huggingface/trl, trl/trainer/ppo_trainer.py at v0.11.4)
# TRL-new     TRL >= 0.12 PPOTrainer (formerly PPOv2Trainer, a port of the N+ loop; read at v0.20.0)
# OpenRLHF    Hu et al. 2024, "OpenRLHF: An Easy-to-use, Scalable and High-performance RLHF Framework",
#             arXiv:2405.11143, github.com/OpenRLHF/OpenRLHF
# PPO-max     Zheng et al. 2023, "Secrets of RLHF in Large Language Models Part I: PPO", arXiv:2307.04964, and
#             github.com/OpenLMLab/MOSS-RLHF
# MOSS        the same MOSS-RLHF code
# LLaMA-Factory  github.com/hiyouga/LLaMA-Factory (its PPO stage and Alpaca conversion)
# DeepSpeed   github.com/deepspeedai/DeepSpeed (mixed precision with fp32 master weights); nanoGPT
#             github.com/karpathy/nanoGPT (torchrun detection)
# Schulman    J. Schulman, "Approximating KL Divergence", joschu.net/blog/kl-approx.html; PPO: Schulman et al. 2017,
#             "Proximal Policy Optimization Algorithms", arXiv:1707.06347; GAE: Schulman et al. 2015,
#             "High-Dimensional Continuous Control Using Generalized Advantage Estimation", arXiv:1506.02438
# implementation details #k   item k of docs/ppo-implementation-details.md, the checklist (with sources and tests)
#             this file implements


# ---- PPO math: masked statistics, KL, rewards, GAE, losses, KL controller (pure functions, tested alone) ------------
def masked_mean(x, mask, dim=None):
    """Mean of x over positions where mask is true (along dim, or over everything); NaN in masked slots is ignored."""
    total = torch.where(mask, x, 0.0).sum() if dim is None else torch.where(mask, x, 0.0).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1)


def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    """(x - mean) / std over masked positions (biased variance, as OAI and N+); masked slots become 0.
    Under torchrun the moments span the whole rollout batch of all ranks. The sums are taken in float64 from the
    start (float32 sums of x² lose the variance when |mean| >> std); MPS has no float64 and keeps float32."""
    wide = torch.float32 if x.device.type == "mps" else torch.float64
    x64 = torch.where(mask, x, 0.0).to(wide)
    moments = all_reduce_sum(torch.stack([x64.sum(), (x64 * x64).sum(), mask.sum().to(wide)]))
    mean = moments[0] / moments[2]
    var = (moments[1] / moments[2] - mean ** 2).clamp(min=0)
    out = (x64 - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out.to(x.dtype), 0.0)


def kl_per_token(logprobs, ref_logprobs, estimator="k1"):
    """Per-token estimate of KL(π‖π_ref) from tokens sampled from π (http://joschu.net/blog/kl-approx.html).
    k1 = logp - logp_ref: unbiased, can be negative per token; as a reward its gradient is the exact KL gradient.
    k3 = (r - 1) - log r with r = p_ref/p: unbiased and never negative, lower variance."""
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}")


def is_stop(tokens, stop_ids):
    """True where a token ends a reply: any of the stop ids (an int or a list: chat models end turns with tokens
    other than the tokenizer's EOS, e.g. Llama-3's <|eot_id|>, Gemma's <end_of_turn>, Qwen2.5's two ids)."""
    return torch.isin(tokens, torch.as_tensor(stop_ids, device=tokens.device))


def truncate_after_eos(responses, stop_ids, pad_id):
    """Keep each response up to and including its first stop token (EOS); later tokens become PAD.
    Returns (responses, mask): mask is True on real tokens. Worked example (E = EOS, P = PAD):
        sampled   [a b E c d]  ->  responses [a b E P P], mask [1 1 1 0 0]
        sampled   [a b c d e]  ->  responses [a b c d e], mask [1 1 1 1 1]   (no EOS: cut at MAX_NEW_TOKENS)"""
    stop = is_stop(responses, stop_ids)
    after_first_eos = (stop.cumsum(1) - stop.long()) > 0  # strictly after the first EOS
    return responses.masked_fill(after_first_eos, pad_id), ~after_first_eos


def ends_with_stop(responses, mask, stop_ids):
    """Whether each reply ended with a stop token (False: cut off at MAX_NEW_TOKENS)."""
    return (is_stop(responses, stop_ids) & mask).any(1)


def last_index(mask):
    """Index of the last True in each row (the last real token); 0 for an all-False row."""
    idx = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask, idx, -1).max(1).values.clamp(min=0)


def compute_rewards(scores, logprobs, ref_logprobs, mask, beta, estimator="k1"):
    """Per-token reward r_t = -β·KL_t on every real token, plus the RM score at the last real token.
    The seed's Reward_total = Reward_RM - β·KL(π‖π_ref): the KL penalty is the leash to the reference.
    Score position: the last real token (the EOS when there is one), as TRL-old, OpenRLHF and MOSS do. N+ and
    TRL-new put it one slot later (EOS+1) and train the value there too; with γ = λ = 1 both give the same
    advantages. We keep the score on a token the policy actually chose, so every mask is the response mask.
    Returns (rewards, kl, non_score_reward), all [B, T] and zero at masked slots."""
    kl = torch.where(mask, kl_per_token(logprobs, ref_logprobs, estimator), 0.0)
    non_score_reward = -beta * kl
    rewards = non_score_reward.clone()
    rewards[torch.arange(len(scores)), last_index(mask)] += scores
    return rewards, kl, non_score_reward


def compute_gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (Schulman et al. 2015), reverse recursion over the response:
        δ_t = r_t + γ·V_{t+1} - V_t,   A_t = δ_t + γλ·A_{t+1},   returns_t = A_t + V_t
    with V = 0 and A = 0 after the last real token: the episode ends at EOS, no bootstrap (every anchor does this,
    also for replies cut at MAX_NEW_TOKENS). Masks must be contiguous from position 0, as after truncate_after_eos.
    Advantage = actual score - expected score: the Critic's V_t is the expectation the Reward is compared with."""
    rewards, values = torch.where(mask, rewards, 0.0), torch.where(mask, values, 0.0)
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(next_adv)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = delta + gamma * lam * next_adv
        advantages[:, t] = next_adv
    advantages = torch.where(mask, advantages, 0.0)
    return advantages, advantages + values


def group_advantages(seq_rewards, n, estimator, scale_std=True, eps=1e-4):
    """Critic-free baselines from the other replies to the same prompt. seq_rewards: [B] total reward of each reply,
    B = prompts x n with a prompt's n replies consecutive. Returns [B], one advantage per reply, given to each of its
    tokens. Both sum to 0 within a group.
    grpo: A = (R - mean of the group) / (std of the group + eps)   (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300;
          the std is the unbiased one, as TRL's GRPOTrainer; scale_std=False is Dr. GRPO, Liu et al. 2025,
          "Understanding R1-Zero-Like Training", arXiv:2503.20783: the division favours groups of near-equal rewards)
    rloo: A = R - mean of the other n - 1 replies   (Ahmadian et al. 2024, "Back to Basics", arXiv:2402.14740)"""
    R = seq_rewards.reshape(-1, n)
    if estimator == "grpo":
        A = R - R.mean(1, keepdim=True)
        return (A / (R.std(1, keepdim=True) + eps) if scale_std else A).reshape(-1)
    if estimator == "rloo":
        return (R - (R.sum(1, keepdim=True) - R) / (n - 1)).reshape(-1)
    raise ValueError(f"unknown group estimator {estimator!r}")


def compute_advantages(rewards, values, mask, c):
    """Step 6 for ADVANTAGE. Returns (advantages, returns); returns (the critic's targets) is None without a critic.
    gae:         GAE against the critic's values, whitened over the batch (N+, TRL)
    reinforce++: token-level returns-to-go of the KL-shaped reward (GAE with V = 0, λ = 1), whitened over the batch
                 of all ranks (Hu 2025, "REINFORCE++", arXiv:2501.03262)
    grpo, rloo:  the reply's total reward against its group's (group_advantages), on every token of the reply"""
    if c["ADVANTAGE"] == "gae":
        advantages, returns = compute_gae(rewards, values, mask, c["GAMMA"], c["LAM"])
        return masked_whiten(advantages, mask), returns
    if c["ADVANTAGE"] == "reinforce++":
        returns_to_go, _ = compute_gae(rewards, torch.zeros_like(rewards), mask, c["GAMMA"], 1.0)
        return masked_whiten(returns_to_go, mask), None
    seq = group_advantages(torch.where(mask, rewards, 0.0).sum(1), c["SAMPLES_PER_PROMPT"], c["ADVANTAGE"],
                           c["GRPO_STD"])
    return torch.where(mask, seq[:, None], 0.0), None


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range=0.2):
    """The clipped surrogate objective (Schulman et al. 2017), as a loss to minimise:
        L = -E_t[min(r_t·A_t, clip(r_t, 1-ε, 1+ε)·A_t)],  r_t = π_θ(a_t|s_t) / π_old(a_t|s_t)
    min is the pessimistic choice: a big advantage cannot push the ratio past 1±ε, and a wrong step is pulled back.
    Written as max of the negated terms. Returns (loss, stats): clipfrac (share of tokens where the clip is active),
    approxkl (k2 = ½·mean(log r²), Schulman's estimate of KL(π_old‖π_θ)), mean ratio."""
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((pg_losses_clipped > pg_losses).float(), mask),
                 "approxkl": 0.5 * masked_mean(log_ratio ** 2, mask),
                 "ratio": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values, old_values, returns, mask, clip_range=0.2):
    """Clipped value loss: ½·E[max((V - R)², (clip(V, V_old ± c) - R)²)] (OAI, N+, TRL). Returns (loss, clipfrac)."""
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    losses = (values - returns) ** 2
    losses_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(losses, losses_clipped), mask)
    return loss, masked_mean((losses_clipped > losses).float(), mask).detach()


def entropy_from_logprobs(logp):
    """Exact entropy per position from log-probabilities over the vocabulary: -Σ p·log p (0·log 0 = 0 for a token
    whose logit is -inf)."""
    return -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)


class AdaptiveKLController:
    """Ziegler et al. 2019 (OAI lm-human-preferences): β moves towards the value that keeps KL at the target.
        e = clip(KL / target - 1, -0.2, 0.2),   β ← β·(1 + e·n_steps / horizon)
    KL is the batch mean of the per-reply KL sum (nats per reply); n_steps is the number of episodes just trained."""

    def __init__(self, init_kl_coef, target, horizon, adaptive=True):
        self.value, self.target, self.horizon, self.adaptive = init_kl_coef, target, horizon, adaptive

    def update(self, current_kl, n_steps):
        if self.adaptive:
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


class RunningMoments:
    """Running mean and std of all scores seen so far (Chan et al. parallel update), for SCORE_NORM."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x):
        n, m, v = x.numel(), x.mean().item(), x.var(unbiased=False).item()
        total = self.count + n
        delta = m - self.mean
        self.var = (self.var * self.count + v * n + delta ** 2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total


def repetition_rate(tokens):
    """Share of a reply's token trigrams that already occurred earlier in it (0 = no repetition; 复读机 -> 1)."""
    tri = list(zip(tokens, tokens[1:], tokens[2:]))
    return 1.0 - len(set(tri)) / len(tri) if tri else 0.0


# ---- the four roles: loading them; logprobs, values and scores ------------------------------------------------------
@dataclasses.dataclass
class Roles:
    """The four roles of PPO-RLHF, ready to run: Actor (trained), Reference (frozen), Reward model (frozen, behind
    its scorer), Critic (trained), with the actor's tokenizer and stop tokens. `scorer` gives a reply's reward: the
    reward model's score (RewardScorer, also in `rm`), a reward function's (RewardFunction; `rm` None), or both
    added (REWARD_FN). Under LoRA, `adapters` holds the peft models of actor and critic, and a frozen role may be a
    trained one with its adapters off (AdaptersOff). The run adds what trains them: the modules the training forward
    calls (DDP/FSDP-wrapped under torchrun), their trainable parameters, the optimizer and its LR schedule."""
    tok: object
    stop_ids: list
    actor: torch.nn.Module
    ref: object
    scorer: object
    critic: torch.nn.Module  # None for a critic-free ADVANTAGE
    critic_path: str
    notes: list
    device: torch.device
    dtype: torch.dtype
    rm: object = None
    adapters: dict = dataclasses.field(default_factory=dict)
    actor_train: torch.nn.Module = None
    critic_train: torch.nn.Module = None
    params: list = None
    optimizer: torch.optim.Optimizer = None
    scheduler: object = None
    fsdp: bool = False

    def trained(self):
        """The trained models: actor and critic, or the actor alone (critic-free)."""
        return {k: m for k, m in (("actor", self.actor), ("critic", self.critic)) if m is not None}


def load_roles(c, device, dtype):
    """The four roles: Actor (trained), Reference (frozen), Reward (frozen), Critic (trained), as Roles.
    Mixed precision as OpenRLHF/DeepSpeed do it: what trains holds fp32 weights (an update of lr 1e-6 vanishes in
    bf16 weights) and computes in `dtype` under autocast; the frozen models are stored in `dtype`.
    LoRA (LORA_R > 0): only adapters (and the critic's value head) train, in fp32; the frozen base weights of actor
    and critic are stored in `dtype`, and four roles live in two models: the Reference is the actor with its adapters
    off (when REF_MODEL is the actor's path), the Reward model the critic with its adapters off (when the critic
    defaults to the reward model). Explicit REF_MODEL / CRITIC_MODEL paths load separately.
    A critic-free ADVANTAGE (grpo, rloo, reinforce++) loads no critic: three roles. A .py REWARD_MODEL loads no
    reward model: the reward is that function."""
    ref_path = c["REF_MODEL"] or c["ACTOR_MODEL"]
    frozen_device = torch.device("cpu") if c["OFFLOAD_FROZEN"] else device
    lora = c["LORA_R"] > 0
    tok, notes = load_tokenizer(c["ACTOR_MODEL"], "ACTOR_MODEL")
    fp32 = torch.float32  # trained weights stay fp32 (master weights); DTYPE is the compute dtype (autocast)
    base_dtype = dtype if lora else fp32  # the dtype of a trained model's weights: under LoRA its base is frozen
    actor = load_model("causal", c["ACTOR_MODEL"], "ACTOR_MODEL", device, base_dtype)
    check_tokenizer_fits(tok, actor, c["ACTOR_MODEL"], "ACTOR_MODEL")
    adapters = {"actor": Adapter(add_adapters(actor, c, "CAUSAL_LM"), lambda: load_model(
        "causal", c["ACTOR_MODEL"], "ACTOR_MODEL", torch.device("cpu"), base_dtype))} if lora else {}
    if lora and ref_path == c["ACTOR_MODEL"]:  # the SFT weights are the actor's base: no second copy
        ref = AdaptersOff(actor, adapters["actor"].peft)
    else:
        ref = freeze(load_model("causal", ref_path, "REF_MODEL", frozen_device, dtype))
    rm = rm_model = None
    if c["REWARD_MODEL"].endswith(".py"):  # a reward function (rule-based, "verifiable"): no reward model
        scorer = RewardFunction(c["REWARD_MODEL"], "REWARD_MODEL", device)
        if c["REWARD_FN"]:
            scorer = RewardFunction(c["REWARD_FN"], "REWARD_FN", device, scorer)
    else:
        rm_tok, rm_notes = load_tokenizer(c["REWARD_MODEL"], "REWARD_MODEL")
        rm_model = freeze(load_model("reward", c["REWARD_MODEL"], "REWARD_MODEL", frozen_device, dtype,
                                     label=c["REWARD_LABEL"]))
        check_tokenizer_fits(rm_tok, rm_model.model, c["REWARD_MODEL"], "REWARD_MODEL")
        rm = RewardScorer(rm_model, rm_tok, tok, device)
        notes += rm_notes
        if not rm.same_tokenizer and rm.max_len and rm.max_len < c["MAX_PROMPT_TOKENS"] + c["MAX_NEW_TOKENS"]:
            notes.append(f"the reward model reads at most {rm.max_len} of its tokens: a longer conversation keeps its "
                         f"last {rm.max_len} (a decoder) or is truncated by its tokenizer (an encoder)")
        scorer = RewardFunction(c["REWARD_FN"], "REWARD_FN", device, rm) if c["REWARD_FN"] else rm
    fresh = False  # whether the critic gets a new value head
    if c["ADVANTAGE"] != "gae":  # critic-free: the baseline comes from other replies, three roles
        critic_path = critic = None
    elif c["CRITIC_MODEL"]:  # an explicit critic must read the actor's tokens
        critic_tok, _ = load_tokenizer(c["CRITIC_MODEL"], "CRITIC_MODEL")
        if critic_tok.get_vocab() != tok.get_vocab():
            raise ConfigError(f"CRITIC_MODEL {c['CRITIC_MODEL']!r} uses a different tokenizer from the actor; the critic "
                              f"values the actor's tokens, so give a value model with the actor's tokenizer, or "
                              f"--critic_model= for the default")
        critic_path = c["CRITIC_MODEL"]
        critic = load_model("score", c["CRITIC_MODEL"], "CRITIC_MODEL", device, base_dtype)
    elif rm and rm.same_tokenizer and rm_model.model.config.num_labels == 1:  # default: a trained copy of the RM (N+)
        critic_path = c["REWARD_MODEL"]
        # under LoRA the copy is the RM itself: its adapters and a trained copy of its score head make the critic
        critic = rm_model.to(device) if lora else load_model("score", c["REWARD_MODEL"], "CRITIC_MODEL", device, fp32)
    else:  # the RM gives no value per actor token: the actor's weights with a fresh, zero value head (OAI)
        critic_path, fresh = c["ACTOR_MODEL"], True
        critic = load_model("score", c["ACTOR_MODEL"], "CRITIC_MODEL", device, base_dtype, fresh_value_head=True)
        why = ("the reward is a function, not a model" if rm is None
               else "the reward model is an encoder classifier, read through its own tokenizer and pooling"
               if rm_model.own_pooling else "the reward model's tokenizer differs from the actor's: replies are "
               "re-tokenised for it" if not rm.same_tokenizer else "the reward model has several outputs")
        notes.append(f"{why}; the critic is the actor's weights with a new zero-initialised value head")
    if lora and critic is not None:
        adapters["critic"] = Adapter(add_adapters(critic.model, c, "SEQ_CLS"), lambda: load_model(
            "score", critic_path, "CRITIC_MODEL", torch.device("cpu"), base_dtype, fresh_value_head=fresh).model)
        if critic is rm_model:  # the judge is the critic's weights with its adapters off, its own score head included
            rm.model = AdaptersOff(rm_model, adapters["critic"].peft)
    if critic is not None:
        critic.model.config.pad_token_id = tok.pad_token_id
    if c["GRADIENT_CHECKPOINTING"]:
        for m in [actor] + ([critic.model] if critic is not None else []):
            m.activation_checkpointing_enable({"use_reentrant": False})
    return Roles(tok, stop_token_ids(tok, actor, c["STOP_TOKENS"]), actor, ref, scorer, critic, critic_path, notes,
                 device, dtype, rm=rm, adapters=adapters)


def autocast(device, dtype):
    """Forward passes in `dtype` (bf16 on GPUs) with fp32 weights; a no-op in fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def check_model_path(path, role):
    """A local folder must exist; anything shaped like a hub name ("org/name") is left to from_pretrained."""
    if not path:
        raise ConfigError(f"{role}: no model path given")
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1 or os.path.exists(path)
    if looks_local and not os.path.isdir(path):
        raise ConfigError(f"{role}: model folder {path!r} not found; give a local folder with config.json, or a hub "
                          f"name like Qwen/Qwen2.5-0.5B-Instruct (on a machine that reaches the hub)")


def first_line(e):
    """An exception as one short line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def remote_code_error(role, path, model_type):
    return ConfigError(f"{role}: {path!r} needs its own Python code (model_type {model_type!r} is not an architecture "
                       f"transformers {__import__('transformers').__version__} ships); code from a model folder is "
                       f"never run here: use a checkpoint of a built-in architecture, or a transformers that has it")


def read_config(path, role):
    """AutoConfig of a local folder or hub name. Code from a model folder never runs (trust_remote_code=False,
    passed explicitly: otherwise transformers may ask on a terminal, and a "y" runs it). One clear line for a
    config.json that is not JSON, a checkpoint that needs its own code, and a hub name without the hub."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    check_model_path(path, role)
    local = os.path.isdir(path)
    if local:
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise ConfigError(f"{role}: {path!r} has no config.json; give a folder written by save_pretrained")
        try:
            with open(file, encoding="utf-8") as f:
                raw = json.load(f)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are
            raise ConfigError(f"{role}: {file} is not valid JSON ({first_line(e)}); restore it from the model's "
                              f"source") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{role}: {file} is not a model config (a JSON object); restore it from the source")
        if "auto_map" in raw and raw.get("model_type") not in CONFIG_MAPPING:
            raise remote_code_error(role, path, raw.get("model_type"))
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # the user's files or a hub name: any failure is theirs to fix, reported in one line
        if "trust_remote_code" in str(e):
            raise remote_code_error(role, path, "?") from None
        if local:
            raise ConfigError(f"{role}: cannot read the config of {path!r} ({first_line(e)})") from None
        raise ConfigError(f"{role}: cannot load {path!r} ({first_line(e)}); offline, download the model once and "
                          f"pass its local folder") from None


def max_positions(model):
    """The longest sequence the model has learned positions for (config.max_position_embeddings: GPT-2's n_positions,
    OPT's 2048, a rotary model's trained context; the text part of a multimodal config); None if it names none."""
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


def load_model(kind, path, role, device, dtype, fresh_value_head=False, label=""):
    """from_pretrained by local path or hub name, with one clear line for the usual mistakes.
    kind "causal" -> whatever AutoModelForCausalLM loads and gives logits over the vocabulary: ...ForCausalLM, and
    the ...ForConditionalGeneration checkpoints it loads for text (Gemma 3 4B and larger).
    kind "score" -> ScoreModel around a decoder ...ForSequenceClassification model with one output, read at chosen
    positions (the critic). fresh_value_head: built from a causal LM checkpoint with a zero-initialised head (V = 0 at
    the start, as OAI's value head), for a critic that must read the actor's tokens.
    kind "reward" -> ScoreModel around any ...ForSequenceClassification model (the frozen judge): a decoder is read at
    the last real token, an encoder classifier (DeBERTa, RoBERTa, DistilBERT) through its own pooling; with several
    outputs, `label` (REWARD_LABEL) names the one that scores."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    config = read_config(path, role)
    archs = config.architectures or []
    if kind == "causal" and archs and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
                                              for a in archs):
        raise ConfigError(f"{role}: {path!r} is a {archs[0]}, not a causal LM; the actor and reference must be "
                          f"...ForCausalLM models (the reward model goes in REWARD_MODEL)")
    if kind != "causal" and archs and not fresh_value_head and not any("ForSequenceClassification" in a for a in archs):
        raise ConfigError(f"{role}: {path!r} is a {archs[0]}, not a sequence-classification model; give a reward "
                          f"model (...ForSequenceClassification)")
    quantised = getattr(config, "quantization_config", None)
    if quantised:
        method = quantised.get("quant_method", "?") if isinstance(quantised, dict) else type(quantised).__name__
        raise ConfigError(f"{role}: {path!r} is a quantised checkpoint ({method}); quantised bases (QLoRA's 4-bit, GPTQ, "
                          f"AWQ) are not supported: give the full-precision model (--lora_r=16 trains it with LoRA "
                          f"adapters over a frozen base stored in DTYPE)")
    if getattr(config, "activation_function", None) == "gelu_new":
        # GPT-2's gelu_new is the tanh approximation of GELU written as 8 Python-level ops; PyTorch's
        # F.gelu(approximate="tanh") computes the same function in one kernel (equal to ~1e-7): 15% of a demo step.
        config.activation_function = "gelu_pytorch_tanh"
    for key, value in config.to_dict().items():  # no dropout in any role (Ziegler et al. 2019; N+ disable_dropout)
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            setattr(config, key, 0.0)
    if fresh_value_head:
        config.num_labels = 1
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    try:
        model = auto.from_pretrained(path, config=config, dtype=dtype, trust_remote_code=False)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # the user's files: reported in one line, whatever transformers raised
        if isinstance(e, ValueError) and "Unrecognized configuration class" in str(e):
            what = ("a causal LM (AutoModelForCausalLM" if kind == "causal"
                    else "a sequence-classification model (AutoModelForSequenceClassification")
            raise ConfigError(f"{role}: {path!r} ({config.model_type}, {archs[0] if archs else 'no architecture'}) "
                              f"cannot be loaded as {what} has no class for {config.model_type!r})") from None
        raise ConfigError(f"{role}: cannot load the weights of {path!r} ({first_line(e)}); if the files are "
                          f"truncated or corrupt, copy them again from the model's source") from None
    for m in model.modules():  # modules that copied their rate before the config was changed
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    if kind == "causal":
        if model.get_output_embeddings() is None:
            raise ConfigError(f"{role}: {path!r} loads as {type(model).__name__}, which has no language-model head; "
                              f"the actor and reference must give logits over the vocabulary")
        return model.to(device).eval()
    if kind == "score" and not hasattr(model, "score"):
        raise ConfigError(f"{role}: {type(model).__name__} has no `score` head to read a value at every token; use a "
                          f"decoder ...ForSequenceClassification model (GPT-2, Llama, Qwen2, ...), or --critic_model= "
                          f"for the default")
    index = output_index(model.config, label, role, path)
    if fresh_value_head:
        with torch.no_grad():
            model.score.weight.zero_()
            if getattr(model.score, "bias", None) is not None:
                model.score.bias.zero_()
    return ScoreModel(model, index).to(device).eval()


def output_index(config, label, role, path):
    """Which output of a classifier is the score: the only one, or REWARD_LABEL (an index or a label name, e.g.
    "POSITIVE" of a sentiment classifier; its raw logit is the score, as in TRL's sentiment examples)."""
    names = [str(config.id2label.get(i, i)) for i in range(config.num_labels)]
    if label == "":
        if config.num_labels == 1:
            return 0
        fix = ("a value model needs exactly one (num_labels = 1)" if role == "CRITIC_MODEL" else
               "a reward model needs exactly one, or --reward_label=NAME (or index) naming the one that scores")
        raise ConfigError(f"{role}: {path!r} has {config.num_labels} outputs ({', '.join(names)}); {fix}")
    if label.isdigit() and int(label) < len(names):
        return int(label)
    if label in names:
        return names.index(label)
    raise ConfigError(f"REWARD_LABEL {label!r} is not an output of {path!r}; its outputs are "
                      f"{', '.join(f'{i} = {n}' for i, n in enumerate(names))}")


def load_tokenizer(path, role):
    """The model's own tokenizer, left-padding, never running code from its folder. Training pads with PAD_ID and
    explicit masks, so the tokenizer's pad token only matters to users of the saved model: a tokenizer without one
    gets its EOS as pad (a real token), so that batched generate() works with the tokenizer saved beside the actor."""
    from transformers import AutoTokenizer
    read_config(path, role)  # the folder's config.json first: its errors are clearer than the tokenizer's
    try:
        tok = AutoTokenizer.from_pretrained(path, padding_side="left", trust_remote_code=False)
    except Exception as e:  # the user's files: any failure is theirs to fix, reported in one line
        if "trust_remote_code" in str(e):
            raise remote_code_error(role, path, "?") from None
        raise ConfigError(f"{role}: cannot load the tokenizer of {path!r} ({first_line(e)}); the folder needs the "
                          f"model's tokenizer files (tokenizer.json, tokenizer_config.json, ...)") from None
    notes = []
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
        notes.append(f"{role}: the tokenizer has no pad token; its EOS {tok.eos_token!r} pads in the saved tokenizer "
                     f"(training pads with masks, never with a token)")
    return tok, notes


def check_tokenizer_fits(tok, model, path, role):
    """A folder without tokenizer files still gives a tokenizer: transformers builds a stand-in of a handful of tokens
    from the model type, and a run with it 'succeeds' on one-token replies. A real tokenizer covers most of the
    embedding table (tables are padded a little past it: Qwen2.5 has 151,665 tokens in 151,936 rows)."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tok) < rows // 2:
        raise ConfigError(f"{role}: the tokenizer of {path!r} has {len(tok)} tokens for {rows} embedding rows: the "
                          f"folder lacks the model's tokenizer files; copy tokenizer.json and tokenizer_config.json "
                          f"(or its vocabulary files) from where the model came from")


def stop_token_ids(tok, model, override):
    """The ids that end a reply: the EOS ids of the actor's generation_config (an int or a list) and the tokenizer's
    EOS, or STOP_TOKENS (token texts or ids, comma-separated) instead. Chat models end a turn with a token other than
    the tokenizer's EOS (Llama-3-Instruct <|eot_id|>, Gemma-it <end_of_turn>, Qwen2.5-Instruct lists two ids): with the
    EOS alone such a model never ends a reply."""
    if override:
        ids = []
        for item in (x.strip() for x in override.split(",")):
            i = int(item) if item.isdigit() else tok.convert_tokens_to_ids(item)
            if i is None or not 0 <= i < len(tok) or (i == tok.unk_token_id and item != tok.unk_token):
                raise ConfigError(f"STOP_TOKENS: {item!r} is not one token of the actor's tokenizer; give token texts "
                                  f"as the tokenizer writes them (e.g. <|eot_id|>) or ids below {len(tok)}")
            ids.append(i)
    else:
        eos = getattr(model.generation_config, "eos_token_id", None)
        ids = ([eos] if isinstance(eos, int) else list(eos or [])) + [tok.eos_token_id]
    ids = sorted({i for i in ids if i is not None})
    if not ids:
        raise ConfigError("ACTOR_MODEL: neither its tokenizer nor its generation_config names an EOS token; name the "
                          "tokens that end a reply with --stop_tokens=...")
    return ids


def freeze(model):
    """Reference and reward model: eval(), no gradients, no optimizer state."""
    model.requires_grad_(False)
    return model.eval()


def frozen_forward(model, fn, *args):
    """fn(model, *args) for a frozen model, under inference_mode (no_grad for a trained model with its adapters off:
    FSDP's gathered weights must not become inference tensors). A model kept on the CPU between uses
    (OFFLOAD_FROZEN) visits the inputs' device for the call. The result is cloned outside inference_mode so that
    later autograd ops may read it."""
    device = args[0].device
    visiting = next(model.parameters()).device != device
    if visiting:
        model.to(device)
    with torch.no_grad() if isinstance(model, AdaptersOff) else torch.inference_mode():
        out = fn(model, *args)
    if visiting:
        model.to("cpu")
    return out.clone()


def add_adapters(model, c, task):
    """LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685) through peft,
    in place: every base weight frozen, beside each targeted layer a trainable update B·A·(alpha/r) with B = 0 at the
    start, so the adapted model is exactly the base model at step 0 (step-1 KL = 0); no LoRA dropout (no dropout
    anywhere in PPO). task "SEQ_CLS" (the critic) also gives the model a trainable copy of its score head, the value
    head, keeping the original for when the adapters are off. What trains is kept in fp32 (master weights) whatever
    the base's dtype. Returns the PeftModel (adapters off, save, merge); `model` itself now runs with the adapters."""
    try:
        import peft
    except ImportError:
        raise ConfigError("LORA_R > 0 needs the peft package: pip install peft (or --lora_r=0 for full "
                          "fine-tuning)") from None
    names = c["LORA_TARGET_MODULES"]
    targets = names if names == "all-linear" else [n.strip() for n in names.split(",") if n.strip()]
    config = peft.LoraConfig(r=c["LORA_R"], lora_alpha=c["LORA_ALPHA"], lora_dropout=0.0, target_modules=targets,
                             bias="none", task_type=task)
    with warnings.catch_warnings():  # GPT-2's Conv1D layers store weights transposed; peft notes it and adapts
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        try:
            peft_model = peft.get_peft_model(model, config)
        except ValueError as e:  # names that match no layer of this model
            raise ConfigError(f"LORA_TARGET_MODULES {names!r}: {first_line(e)}; give layer names of this model "
                              f"(e.g. q_proj,v_proj for Llama, c_attn for GPT-2) or all-linear") from None
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return peft_model


@dataclasses.dataclass
class Adapter:
    """A trained model's LoRA adapters: its peft model, and how to load its base again (to save it merged)."""
    peft: object
    load_base: object


class AdaptersOff:
    """A frozen role that shares a trained role's weights under LoRA: the trained model called with its adapters
    switched off (peft's disable_adapter), which is exactly the base it started from, original score head included.
    The Reference is the actor without its adapters, the Reward model the critic without its adapters: no second
    copy in memory. Everything but the call (config, parameters(), ...) reads through to the wrapped module."""

    def __init__(self, module, peft_model):
        self.module, self.peft_model = module, peft_model

    def __call__(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.module(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.module, name)


def trainable_parameters(modules):
    """What the optimizer steps: every weight in full fine-tuning; adapters and the value head under LoRA."""
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def position_ids_of(attention_mask):
    """Positions that count real tokens only, so left padding does not shift them (implementation details #2)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def model_inputs(ids, attention_mask):
    """Pad slots -> id 0 before the embedding lookup: an added pad token may lie beyond the embedding table, and
    masked slots are never attended to, so any valid id will do (N+, TRL)."""
    return ids.masked_fill(~attention_mask.bool(), 0)


def response_logprobs(model, query_responses, attention_mask, context_length, temperature, with_entropy=False):
    """Log π(token_t | earlier tokens) of every response token, from temperature-scaled logits (OAI, N+).
    Token t is predicted at position t-1, so the response's logits are logits[:, ctx-1:-1] (implementation
    details #5); only those T+1 positions are projected to the vocabulary (logits_to_keep). Log-softmax in fp32
    whatever the weights' dtype, then the sampled token gathered. One fused log_softmax measured faster on CPU than
    gather minus logsumexp (forward + backward: 79 vs 187 µs on [8, 21, 783], 53 vs 93 ms on [8, 64, 32000]) at the
    same peak memory: logsumexp's backward builds the full [B, T, V] softmax anyway."""
    T = query_responses.shape[1] - context_length
    out = model(input_ids=model_inputs(query_responses, attention_mask), attention_mask=attention_mask,
                position_ids=position_ids_of(attention_mask), logits_to_keep=T + 1, use_cache=False)
    logp = torch.log_softmax(out.logits[:, :-1].float() / temperature, -1)                 # [B, T, V]
    tokens = model_inputs(query_responses, attention_mask)[:, context_length:]
    logprobs = logp.gather(-1, tokens[..., None]).squeeze(-1)
    if not with_entropy:
        return logprobs
    with torch.no_grad():
        return logprobs, entropy_from_logprobs(logp)


class ScoreModel(torch.nn.Module):
    """A ...ForSequenceClassification model (reward model or critic) read as scalars: output `index` of a decoder's
    backbone + `score` head at the positions we choose. positions: a [B] index tensor -> [B] (one per row), or a
    slice -> [B, len]. (The model's own pooling guesses the last real token from pad ids; we know it.) An encoder
    classifier has no `score` head (own_pooling): it reads its own tokens through its own pooling ([CLS] and a
    classifier head), [B]. A module of its own so that DDP and FSDP wrap exactly what the critic's training forward
    runs."""

    def __init__(self, model, index=0):
        super().__init__()
        self.model, self.index = model, index
        self.own_pooling = not hasattr(model, "score")

    def forward(self, input_ids, attention_mask, positions=None, token_type_ids=None):
        if self.own_pooling:  # the encoder's own ids, padding and positions, as its tokenizer made them
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits[:, self.index].float()
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(input_ids=model_inputs(input_ids, attention_mask), attention_mask=attention_mask,
                          position_ids=position_ids_of(attention_mask), use_cache=False).last_hidden_state
        rows = slice(None) if isinstance(positions, slice) else torch.arange(len(hidden), device=hidden.device)
        return self.model.score(hidden[rows, positions])[..., self.index].float()


def call(model, *args):
    """model(*args), as a function for frozen_forward."""
    return model(*args)


def critic_values(critic, query_responses, attention_mask, context_length):
    """V_t, the value of the state *before* response token t: the same ctx-1:-1 slice as the logprobs (OAI, N+)."""
    return critic(query_responses, attention_mask, slice(context_length - 1, -1))


class RewardScorer:
    """Scores prompt + reply with the frozen reward model (implementation details #10), one of three ways:
    - a decoder RM with the actor's tokenizer: the actor's ids as they are, read at the last real token;
    - a decoder RM with another tokenizer: the reply is decoded (up to its stop token) and the conversation
      re-tokenised by the RM's tokenizer, through its chat template when it has one (prompt as user turn, reply as
      assistant turn), with the RM's EOS only when the reply ended; read at its last real token, keeping the last
      max_len tokens when the conversation is longer than the RM's positions;
    - an encoder classifier (own_pooling: DeBERTa-v3 reward models, DistilBERT/RoBERTa sentiment classifiers): its own
      tokenizer and pooling, (prompt, reply) encoded as a text pair (or through its chat template if it has one),
      padded on the right and truncated to its positions by its tokenizer."""

    def __init__(self, model, tok, actor_tok, device):
        self.model, self.tok, self.actor_tok, self.device = model, tok, actor_tok, device
        self.same_tokenizer = not model.own_pooling and tok.get_vocab() == actor_tok.get_vocab()
        self.max_len = max_positions(model.model)
        if model.own_pooling:
            tok.padding_side = "right"  # an encoder's text starts at position 0, as in its training
        # segment ids for a text pair, where the model takes them (BERT, DeBERTa; not DistilBERT, RoBERTa)
        self.token_types = "token_type_ids" in inspect.signature(model.model.forward).parameters

    def rm_ids(self, conv, reply, ended):
        """RM token ids of one conversation: the same layout the actor's ids have (templated prompt with the
        generation prompt, then the reply, then EOS only if the reply ended), in the RM's own tokens."""
        prompt = format_prompt(self.tok, conv)
        ids = self.tok(prompt, add_special_tokens=not self.tok.chat_template)["input_ids"] \
            + self.tok(reply, add_special_tokens=False)["input_ids"]
        return ids + [self.tok.eos_token_id] if ended and self.tok.eos_token_id is not None else ids

    def __call__(self, query_responses, attention_mask, context_length, prompts, replies, ended):
        """[B] scores; prompts: the (conversation, prompt text, ids) of each row."""
        if self.same_tokenizer:
            return frozen_forward(self.model, call, query_responses, attention_mask, last_index(attention_mask))
        if self.model.own_pooling:
            kw = dict(padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
            if self.tok.chat_template:
                enc = self.tok([format_prompt(self.tok, p[0]) + r for p, r in zip(prompts, replies)],
                               add_special_tokens=False, **kw)
            else:
                enc = self.tok([conversation_text(p[0]) for p in prompts], list(replies), **kw)
            return frozen_forward(self.model, call, enc["input_ids"].to(self.device),
                                  enc["attention_mask"].to(self.device), None,
                                  enc["token_type_ids"].to(self.device) if self.token_types and "token_type_ids" in enc
                                  else None)
        rows = [self.rm_ids(p[0], r, e) for p, r, e in zip(prompts, replies, ended)]
        ids, mask = left_pad([r[-self.max_len:] if self.max_len else r for r in rows], PAD_ID, self.device)
        return frozen_forward(self.model, call, ids, mask, last_index(mask))


def load_score_fn(path, what):
    """score(prompts, responses) -> list[float] from a Python file (GOLD_REWARD, or a reward function in
    REWARD_MODEL / REWARD_FN), checked on every call: one value per reply, all finite."""
    off = {"GOLD_REWARD": "--gold_reward= to turn it off", "REWARD_FN": "--reward_fn= to turn it off",
           "REWARD_MODEL": "a reward model folder instead"}[what]
    if not os.path.isfile(path):
        raise ConfigError(f"{what} file {path!r} not found; give a .py file with score(prompts, responses), or {off}")
    spec = importlib.util.spec_from_file_location(f"score_fn_{what.lower()}", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # the user's file: any import error is theirs to fix, reported in one line
        raise ConfigError(f"{what} {path!r} failed to import: {type(e).__name__}: {e}") from None
    if not callable(getattr(mod, "score", None)):
        raise ConfigError(f"{what} {path!r} has no function score(prompts, responses)")

    def score(prompts, responses):
        try:
            out = [float(x) for x in mod.score(prompts, responses)]
        except Exception as e:  # the user's function: reported in one line, whatever it raised
            raise ConfigError(f"{what} {path!r}: score() failed ({first_line(e)}); fix the function, or {off}") from None
        if len(out) != len(responses):
            raise ConfigError(f"{what} {path!r}: score() returned {len(out)} values for {len(responses)} replies")
        if not all(math.isfinite(x) for x in out):
            raise ConfigError(f"{what} {path!r}: score() returned NaN or infinity")
        return out
    return score


class RewardFunction:
    """A rule-based ("verifiable") reward: score(prompts, responses) -> list[float] from a .py file, the GOLD_REWARD
    contract, called with the prompt texts the policy saw and the decoded replies (answer checking, format rules).
    With rm (REWARD_FN beside a reward model) its score is added to the reward model's, e.g. a format penalty."""

    def __init__(self, path, what, device, rm=None):
        self.fn, self.device, self.rm = load_score_fn(path, what), device, rm

    def __call__(self, query_responses, attention_mask, context_length, prompts, replies, ended):
        scores = torch.tensor(self.fn([p[1] for p in prompts], list(replies)), dtype=torch.float32, device=self.device)
        if self.rm is None:
            return scores
        return self.rm(query_responses, attention_mask, context_length, prompts, replies, ended) + scores


# ---- data: prompt file -> prompts -----------------------------------------------------------------------------------
def read_records(path, what):
    """The records of a prompt file: a JSON list, JSONL, or Parquet (through pandas, which needs pyarrow)."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path!r} not found; give a JSON, JSONL or Parquet file of prompt records")
    if path.endswith(".parquet"):
        try:
            rows = pd.read_parquet(path).to_dict("records")
        except ImportError:
            raise ConfigError(f"{what} {path!r}: reading Parquet needs pyarrow: pip install pyarrow") from None
        except Exception as e:  # the user's file: any failure is theirs to fix, reported in one line
            raise ConfigError(f"{what} {path!r} cannot be read as Parquet ({first_line(e)})") from None
        rows = [plain(r) for r in rows]
    else:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ConfigError(f"{what} {path!r} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        try:
            rows = json.loads(text)
            rows = [rows] if isinstance(rows, dict) else rows
        except json.JSONDecodeError:
            try:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError:
                raise ConfigError(f"{what} {path!r} is neither JSON nor JSONL; expected a list of prompt records "
                                  f"(Alpaca, chat, ShareGPT or prompt)") from None
    if not isinstance(rows, list) or not rows:
        raise ConfigError(f"{what} {path!r} holds no records; expected a non-empty list of prompt records")
    return rows


def plain(x):
    """A Parquet cell as JSON would give it: arrays -> lists, missing values (NaN, None) -> None."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [plain(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


# Prompt formats: the key that marks each (checked in this order on a file's first record) and what it holds
PROMPT_FORMATS = {
    "messages": "chat: 'messages', a list of {role, content} turns",
    "conversations": "ShareGPT: 'conversations', a list of {from, value} turns",
    "prompt": "prompt: 'prompt', a text or a list of {role, content} turns",
    "instruction": "Alpaca: 'instruction' text (+ optional 'input')",
}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def user_text(record):
    """User turn = instruction, newline, input (LLaMA-Factory's Alpaca conversion)."""
    inp = record.get("input") or ""
    return record["instruction"] + ("\n" + inp if inp else "")


def conversation(record, key):
    """A record -> the prompt: a text (one user turn: Alpaca, a 'prompt' text) or a list of {role, content} turns up
    to and including the last user turn (system turns kept, a trailing assistant turn dropped: the reply to it is
    what PPO samples). None when the record does not fit its file's format. Outputs are never read."""
    if key == "instruction":
        ok = isinstance(record.get("instruction"), str) and isinstance(record.get("input") or "", str)
        return user_text(record) if ok else None
    turns = record.get(key)
    if key == "prompt" and isinstance(turns, str):
        return turns
    if key == "conversations" and isinstance(turns, list):
        turns = [{"role": SHAREGPT_ROLES.get(t.get("from")), "content": t.get("value")} if isinstance(t, dict)
                 else None for t in turns]
    if not isinstance(turns, list) or not all(isinstance(t, dict) and t.get("role") in ("system", "user", "assistant")
                                              and isinstance(t.get("content"), str) for t in turns):
        return None
    users = [i for i, t in enumerate(turns) if t["role"] == "user"]
    return [{"role": t["role"], "content": t["content"]} for t in turns[:users[-1] + 1]] if users else None


def conversation_text(conv):
    """A prompt as one text (an encoder reward model's first segment, a base model's prompt): the turns' contents."""
    return conv if isinstance(conv, str) else "\n".join(t["content"] for t in conv)


def format_prompt(tok, conv):
    """The prompt the actor sees: its chat template with the generation prompt, or plain text for base models.
    conv: a text (one user turn) or a list of {role, content} turns."""
    if not tok.chat_template:
        return conversation_text(conv) + "\n"
    turns = [{"role": "user", "content": conv}] if isinstance(conv, str) else conv
    try:
        return tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # the model folder's template (Jinja): its errors are the user's to fix
        raise ConfigError(f"the chat template of {tok.name_or_path!r} fails on a user turn ({first_line(e)}); fix "
                          f"chat_template in its tokenizer_config.json or chat_template.jinja") from None


def prompt_budget(c, models):
    """The prompt tokens a run can take: MAX_PROMPT_TOKENS, or fewer where a prompt + MAX_NEW_TOKENS would pass the
    learned positions of a model that reads the actor's tokens (GPT-2 1024, OPT 2048: past them generation crashes).
    models: [(role, model)]. Returns (budget, (what sets it, how to raise it)) for load_prompts."""
    limits = sorted((max_positions(m), role) for role, m in models if max_positions(m))
    if not limits or limits[0][0] - c["MAX_NEW_TOKENS"] >= c["MAX_PROMPT_TOKENS"]:
        return c["MAX_PROMPT_TOKENS"], None
    positions, role = limits[0]
    if positions - c["MAX_NEW_TOKENS"] < 1:
        raise ConfigError(f"MAX_NEW_TOKENS = {c['MAX_NEW_TOKENS']} leaves no room for a prompt in the {positions} "
                          f"positions of {role}; lower --max_new_tokens")
    return positions - c["MAX_NEW_TOKENS"], (f"{positions - c['MAX_NEW_TOKENS']} tokens ({positions} positions of "
                                             f"{role} - MAX_NEW_TOKENS = {c['MAX_NEW_TOKENS']})",
                                             "lower --max_new_tokens")


def load_prompts(path, tok, max_tokens, what, log=print, why=None):
    """-> list of (conversation, prompt_text, prompt_ids); prompts over max_tokens are dropped with a warning.
    The format is detected once per file, from its first record, and said. why: (what sets max_tokens, how to
    raise it), from prompt_budget; None: MAX_PROMPT_TOKENS."""
    why = why or (f"MAX_PROMPT_TOKENS = {max_tokens}", "raise --max_prompt_tokens")
    rows = read_records(path, what)
    key = next((k for k in PROMPT_FORMATS if isinstance(rows[0], dict) and k in rows[0]), None)
    if key is None:
        raise ConfigError(f"{what} {path!r}: the first record fits no prompt format; give one of: "
                          + "; ".join(PROMPT_FORMATS.values()))
    convs = [conversation(r, key) if isinstance(r, dict) else None for r in rows]
    bad = [i for i, conv in enumerate(convs) if conv is None]
    if bad:
        raise ConfigError(f"{what} {path!r}: record {bad[0]} (and {len(bad) - 1} more) does not fit the file's format, "
                          f"{PROMPT_FORMATS[key]} with a user turn")
    log(f"{what} {path}: {len(rows)} records, format {PROMPT_FORMATS[key].split(':')[0]}")
    out = []
    for conv in convs:
        text = format_prompt(tok, conv)
        ids = tok(text, add_special_tokens=not tok.chat_template)["input_ids"]
        if len(ids) <= max_tokens:
            out.append((conv, text, ids))
    if not out:
        raise ConfigError(f"{what} {path!r}: all {len(rows)} prompts are longer than {why[0]}; {why[1]}")
    if len(out) < len(rows):
        log(f"warning: {what} {path}: dropped {len(rows) - len(out)} of {len(rows)} prompts longer than {why[0]}")
    return out


# ---- rollout: steps 1-6 of a PPO step -------------------------------------------------------------------------------
def left_pad(rows, pad_id, device):
    """Id lists -> left-padded (ids, attention_mask): every prompt ends at the same column, replies start after it."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = True
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sample_responses(model, queries, query_mask, max_new_tokens, temperature, stop_ids, pad_id, sync_stop=False):
    """Exact on-policy sampling with a KV cache: softmax(logits / T), no top-k, top-p or repetition penalty, so the
    behaviour policy is the π in the ratio and the KL (implementation details #3). Rows that have emitted a stop
    token (EOS) get PAD afterwards; the loop stops when every row has (with sync_stop, every row of every rank: a
    sharded FSDP model needs all ranks in each forward). Returns [B, ≤ max_new_tokens] token ids and the log π(token)
    of each, in fp32 from the temperature-scaled logits: the rollout's old logprobs (implementation details #6)."""
    mask = query_mask.long()
    positions = position_ids_of(mask)
    out = model(input_ids=model_inputs(queries, mask), attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    done = torch.zeros(len(queries), dtype=torch.bool, device=queries.device)
    stop_ids = torch.as_tensor(stop_ids, device=queries.device)
    tokens, logprobs = [], []
    positions = positions[:, -1:]
    for _ in range(max_new_tokens):
        logp = torch.log_softmax(out.logits[:, -1].float() / temperature, -1)
        # inverse-CDF draw, as numpy's Generator.choice: the CDF normalised so its last entry is exactly 1, one
        # uniform per row, the first entry above it. Same distribution as torch.multinomial, which draws an
        # exponential per vocabulary entry (measured: 30 vs 210 µs per token for 16 rows x 783 entries on CPU).
        cdf = logp.exp().cumsum(-1)
        u = torch.rand(len(cdf), 1, device=cdf.device)
        nxt = torch.searchsorted(cdf / cdf[:, -1:], u, right=True).squeeze(1)
        logprobs.append(logp.gather(1, nxt[:, None]).squeeze(1))
        nxt = torch.where(done, pad_id, nxt)
        tokens.append(nxt)
        mask = torch.cat([mask, (~done).long()[:, None]], 1)
        done |= is_stop(nxt, stop_ids)
        if len(tokens) == max_new_tokens:
            break
        if sync_stop:
            if all_reduce_sum((~done).sum().reshape(1)).item() == 0:
                break
        elif done.all():
            break
        positions = positions + 1
        out = model(input_ids=model_inputs(nxt[:, None], mask[:, -1:]), attention_mask=mask, position_ids=positions,
                    cache=out.cache, use_cache=True)
    return torch.stack(tokens, 1), torch.stack(logprobs, 1)


def rollout(actor, ref, critic, scorer, tok, stop_ids, prompts, c, device, beta, score_moments=None, sync_stop=False):
    """Steps 1-6 for this rank's share of a rollout batch; a reply ends at any of stop_ids. critic None: a
    critic-free ADVANTAGE. Returns a dict of [B, T] tensors (names as in N+/TRL) and per-reply info."""
    t0 = time.perf_counter()
    # 1 rollout: sample replies to left-padded prompts, with the log π_old of each token
    queries, query_mask = left_pad([p[2] for p in prompts], PAD_ID, device)
    ctx = queries.shape[1]
    sampled, logprobs = sample_responses(actor, queries, query_mask, c["MAX_NEW_TOKENS"], c["TEMPERATURE"],
                                         stop_ids, PAD_ID, sync_stop)
    # 2 truncate after the first EOS; response mask (True on real tokens, EOS included)
    responses, mask = truncate_after_eos(sampled, stop_ids, PAD_ID)
    query_responses = torch.cat([queries, responses], 1)
    attention_mask = torch.cat([query_mask, mask], 1)
    ended = ends_with_stop(responses, mask, stop_ids)
    t_generate = time.perf_counter() - t0

    # 3 reference logprobs and critic values. The old logprobs (actor before this step's updates) are the
    # sampler's (N+, TRL-new), not a second forward of the actor (TRL-old, OpenRLHF): the same model, weights and
    # temperature, one token at a time through the KV cache. Measured on the demo actor, 64 replies: they equal the
    # re-scored ones to 4e-6 per token in fp32 (tested); under bf16 autocast (CPU) to 0.08 (mean -3e-4), inside the
    # clip range, so the first minibatch's ratio is 1 up to that rounding. It saves one of the four forwards.
    t0 = time.perf_counter()
    with torch.no_grad():
        values = critic_values(critic, query_responses, attention_mask, ctx) if critic is not None else None
    ref_logprobs = frozen_forward(ref, response_logprobs, query_responses, attention_mask, ctx, c["TEMPERATURE"])
    logprobs = torch.where(mask, logprobs, INVALID_LOGPROB)
    ref_logprobs = torch.where(mask, ref_logprobs, INVALID_LOGPROB)

    # 4 reward-model score of prompt + reply, read at the last real token
    replies = [tok.decode(r[m].tolist(), skip_special_tokens=True) for r, m in zip(responses.cpu(), mask.cpu())]
    raw_scores = scorer(query_responses, attention_mask, ctx, prompts, replies, ended.tolist())
    scores = raw_scores - c["MISSING_EOS_PENALTY"] * (~ended).float()
    if score_moments is not None:  # SCORE_NORM: running whitening of the score (PPO-max)
        score_moments.update(torch.tensor(all_gather_list(scores.tolist())))
        scores = (scores - score_moments.mean) / math.sqrt(score_moments.var + 1e-8)
    if c["SCORE_CLIP"] > 0:
        scores = scores.clamp(-c["SCORE_CLIP"], c["SCORE_CLIP"])

    # 5 per-token reward: -β·KL_t everywhere (KL_IN = "reward"; with "loss" β·KL is a term of the loss), + score at
    # the last real token
    reward_beta = beta if c["KL_IN"] == "reward" else 0.0
    rewards, kl, non_score_reward = compute_rewards(scores, logprobs, ref_logprobs, mask, reward_beta, c["KL_ESTIMATOR"])
    # 6 advantages: GAE against the critic (returns before whitening; advantages whitened over the real tokens of the
    # whole batch, all ranks: N+, TRL), or a critic-free baseline (compute_advantages)
    advantages, returns = compute_advantages(rewards, values, mask, c)
    return {
        "query_responses": query_responses, "attention_mask": attention_mask, "context_length": ctx,
        "responses": responses, "mask": mask, "ended": ended, "logprobs": logprobs, "ref_logprobs": ref_logprobs,
        "values": values, "scores": scores, "raw_scores": raw_scores, "rewards": rewards, "kl": kl,
        "non_score_reward": non_score_reward, "advantages": advantages, "returns": returns, "replies": replies,
        "beta": beta,
        "time_generate": t_generate, "time_score": time.perf_counter() - t0,
    }


# ---- PPO update: step 7 ---------------------------------------------------------------------------------------------
def trim_padding(query_responses, attention_mask, context_length, mask):
    """A micro-batch without the columns that are padding in all of its rows: left of its longest prompt and right of
    its longest reply. Masked columns change nothing but the work (positions come from the attention mask), and a
    micro-batch's longest reply is usually shorter than the rollout's. Returns (ids, attention_mask, context_length,
    T) with T the response columns kept; slice [B, T] rollout tensors with [:, :T]."""
    first = int(attention_mask[:, :context_length].any(0).int().argmax())
    T = int(mask.any(0).sum())  # replies start at column 0 of the response and are contiguous
    end = context_length + T
    return query_responses[:, first:end], attention_mask[:, first:end], context_length - first, T


def gradient_sync(modules, sync):
    """A context for one micro-batch's forward and backward: with gradient accumulation only the last micro-batch
    of an optimizer step needs the gradient all-reduce (DDP's no_sync on the others; FSDP2's
    set_requires_gradient_sync). Outside torchrun it does nothing."""
    stack = contextlib.ExitStack()
    for m in modules:
        if isinstance(m, torch.nn.parallel.DistributedDataParallel) and not sync:
            stack.enter_context(m.no_sync())
        elif hasattr(m, "set_requires_gradient_sync"):  # FSDP2 (fully_shard)
            m.set_requires_gradient_sync(sync)
    return stack


UPDATE_STATS = ("policy/approxkl_avg", "policy/clipfrac_avg", "policy/entropy_avg", "loss/policy_avg", "loss/value_avg",
                "val/clipfrac_avg", "val/ratio", "loss/kl_avg")
CRITIC_METRICS = ("loss/value_avg", "val/clipfrac_avg", "val/explained_var", "val/mean_value")  # none without a critic


def ppo_update(actor, critic, optimizer, params, batch, c, sizes=None, scheduler=None):
    """Step 7: PPO_EPOCHS passes over freshly shuffled minibatches of the rollout; one optimizer step per minibatch
    of MINI_BATCH_SIZE·GRAD_ACCUM sequences (sizes.accum micro-batches on each rank under torchrun). Losses are token
    means per micro-batch, averaged over the micro-batches of a step (N+, TRL); DDP/FSDP average the gradients over
    ranks, once per optimizer step. actor and critic are what the training forward runs (DDP/FSDP-wrapped or plain);
    train() mode only matters for gradient checkpointing, as every dropout is 0. Returns every micro-batch's stats."""
    sizes = sizes or batch_sizes(c, world_size())
    B, ctx, mb, accum = len(batch["responses"]), batch["context_length"], sizes.micro, sizes.accum
    models = [m for m in (actor, critic) if m is not None]
    for m in models:
        m.train()
    stats, steps = [], []
    for _ in range(c["PPO_EPOCHS"]):
        order = torch.randperm(B)
        for start in range(0, B, mb * accum):
            for k in range(accum):
                idx = order[start + k * mb:start + (k + 1) * mb].to(batch["responses"].device)
                with gradient_sync(models, sync=k == accum - 1):
                    stats.append(micro_batch_backward(actor, critic, batch, idx, ctx, c, accum))
            steps.append(optimizer_step(optimizer, params, c["MAX_GRAD_NORM"], scheduler))
    for m in models:
        m.eval()
    # one device-to-host copy for all micro-batch statistics (an .item() each would wait for the GPU every time)
    stats = [dict(zip(UPDATE_STATS, row)) for row in torch.stack(stats).float().tolist()]
    for i, extra in enumerate(steps):  # the optimizer step's numbers go with its last micro-batch
        stats[(i + 1) * accum - 1].update(extra)
    return stats


def micro_batch_backward(actor, critic, batch, idx, ctx, c, accum):
    """Forward and backward of one micro-batch (rows idx of the rollout): the clipped policy loss plus VF_COEF times
    the clipped value loss (no critic: none), plus β times the k3 KL to the reference when KL_IN = "loss" (GRPO's
    estimator, unbiased and never negative, its gradient through the current logprobs), divided by the micro-batches
    of the optimizer step. Returns its statistics (a tensor; NaN where a term is absent)."""
    mb_ids, mb_attn, mb_ctx, T = trim_padding(batch["query_responses"][idx], batch["attention_mask"][idx], ctx,
                                              batch["mask"][idx])
    m = batch["mask"][idx, :T]
    new_logprobs, entropy = response_logprobs(actor, mb_ids, mb_attn, mb_ctx, c["TEMPERATURE"], with_entropy=True)
    pg_loss, pg = policy_loss(new_logprobs, batch["logprobs"][idx, :T], batch["advantages"][idx, :T], m,
                              c["CLIP_RANGE"])
    loss, nan = pg_loss, torch.tensor(float("nan"), device=pg_loss.device)
    vf_loss = vf_clipfrac = kl_loss = nan
    if critic is not None:
        new_values = critic_values(critic, mb_ids, mb_attn, mb_ctx)
        vf_loss, vf_clipfrac = value_loss(new_values, batch["values"][idx, :T], batch["returns"][idx, :T], m,
                                          c["CLIP_RANGE_VALUE"])
        loss = loss + c["VF_COEF"] * vf_loss
    if c["KL_IN"] == "loss":
        # masked slots get the INVALID_LOGPROB both sides hold there (k3 = 0), so exp() never sees padding's logprobs
        kl_loss = masked_mean(kl_per_token(torch.where(m, new_logprobs, INVALID_LOGPROB),
                                           batch["ref_logprobs"][idx, :T], "k3"), m)
        loss = loss + batch["beta"] * kl_loss
    (loss / accum).backward()
    return torch.stack([pg["approxkl"], pg["clipfrac"], masked_mean(entropy, m), pg_loss.detach(), vf_loss.detach(),
                        vf_clipfrac, pg["ratio"], kl_loss.detach()])


def optimizer_step(optimizer, params, max_grad_norm, scheduler=None):
    """One AdamW step on the accumulated gradients of actor and critic, clipped to max_grad_norm jointly; skipped
    (weights kept) when the gradient is not finite. The LR schedule advances either way: it follows the run's
    progress. Returns its grad norm and whether it was skipped."""
    total_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    grad_norm = getattr(total_norm, "full_tensor", lambda: total_norm)().item()  # FSDP: a DTensor
    skipped = not math.isfinite(grad_norm)  # a NaN/Inf loss or gradient: skip this update, keep the weights
    if not skipped:
        # = clip_grad_norm_, which scales by min(max / (norm + 1e-6), 1): skip the pass when that is 1
        if max_grad_norm and grad_norm + 1e-6 > max_grad_norm:
            torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, total_norm)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return {"policy/grad_norm": grad_norm, "train/skipped_frac": float(skipped)}


# ---- one PPO step: steps 1-8 on this rank's prompts, and its metrics row --------------------------------------------
def ppo_step(roles, prompts, beta, c, sizes, score_moments=None, gold=None):
    """One whole PPO step: the rollout and its advantages (steps 1-6), the clipped updates (step 7), and the step's
    metrics row (step 8; β is adapted by the loop from row["objective/kl"]). Returns (row, rollout batch)."""
    with autocast(roles.device, roles.dtype):
        batch = rollout(roles.actor, roles.ref, roles.critic, roles.scorer, roles.tok, roles.stop_ids, prompts, c,
                        roles.device, beta, score_moments, roles.fsdp)
    # step 7 on every rank, or on none: a batch with a non-finite score anywhere is not trained on
    t0 = time.perf_counter()
    lr = roles.optimizer.param_groups[0]["lr"]  # the rate of this step's first optimizer step
    scores_ok = all_reduce_sum(torch.isfinite(batch["scores"]).all().logical_not().float()).item() == 0
    if scores_ok:
        with autocast(roles.device, roles.dtype):
            mb_stats = ppo_update(roles.actor_train, roles.critic_train, roles.optimizer, roles.params, batch, c, sizes,
                                  roles.scheduler)
    else:
        mb_stats = [dict({k: float("nan") for k in UPDATE_STATS}, **{"policy/grad_norm": float("nan"),
                                                                       "train/skipped_frac": 1.0})]
    row = step_metrics(batch, mb_stats, beta, gold, prompts, lr, time.perf_counter() - t0)
    row["train/bad_scores"] = float(not scores_ok)
    return row, batch


def step_metrics(batch, mb_stats, beta, gold, batch_prompts, lr, t_train):
    """The step's numbers (TRL's names where TRL has one; each declared in METRICS), averaged over all micro-batches
    of the step and over ranks. The loop adds step, episodes, evaluation and timing columns."""
    mask, returns, values = batch["mask"], batch["returns"], batch["values"]
    resp_tokens = [r[m].tolist() for r, m in zip(batch["responses"].cpu(), mask.cpu())]
    row = {
        "objective/scores": batch["scores"].mean().item(),
        "objective/rlhf_reward": (batch["scores"] + batch["non_score_reward"].sum(1)).mean().item(),
        "objective/non_score_reward": batch["non_score_reward"].sum(1).mean().item(),
        "objective/kl": batch["kl"].sum(1).mean().item(),
        "objective/entropy": (-torch.where(mask, batch["logprobs"], 0.0).sum(1)).mean().item(),
        "objective/gold_scores": float(np.mean(gold([p[1] for p in batch_prompts], batch["replies"])))
        if gold else float("nan"),
        **{k: float(np.mean([s[k] for s in mb_stats if k in s])) for k in mb_stats[-1]},
        "resp/length_mean": mask.sum(1).float().mean().item(),
        "resp/eos_frac": batch["ended"].float().mean().item(),
        "resp/repetition": float(np.mean([repetition_rate(t) for t in resp_tokens])),
        "time/generate_s": batch["time_generate"], "time/score_s": batch["time_score"], "time/train_s": t_train,
        "time/tokens_per_s": mask.sum().item() * world_size()
        / (batch["time_generate"] + batch["time_score"] + t_train),
    }
    if values is not None:
        var_returns = torch.var(returns[mask], unbiased=False)
        row["val/explained_var"] = (1 - torch.var((returns - values)[mask], unbiased=False) / var_returns).item() \
            if var_returns > 0 else float("nan")
        row["val/mean_value"] = masked_mean(values, mask).item()
    else:  # no critic: no value metrics (absent from the CSV, not zeros)
        row = {k: v for k, v in row.items() if k not in CRITIC_METRICS}
    if math.isnan(row.get("loss/kl_avg", 0.0)):  # KL_IN = "reward": no KL term in the loss
        del row["loss/kl_avg"]
    return dict(all_mean(row), **{"objective/kl_coef": beta, "lr": lr})


# ---- evaluation -----------------------------------------------------------------------------------------------------
def evaluate(actor, ref, scorer, tok, stop_ids, prompts, c, device, gold, seed, sync_stop=False):
    """Held-out evaluation at a fixed seed (RNG state restored afterwards, so it does not change the run):
    mean RM score, KL to the reference (nats per reply), gold score, reply length, EOS rate, and the replies.
    Under torchrun each rank takes an equal share of the prompts and the results are gathered, in prompt order."""
    rank, world = (torch.distributed.get_rank(), world_size()) if dist_on() else (0, 1)
    share = len(prompts) // world
    mine = prompts[rank * share:(rank + 1) * share]
    out = {"rm": [], "kl": [], "len": [], "eos": [], "replies": []}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + rank)
        for i in range(0, len(mine), 64):
            chunk = mine[i:i + 64]
            queries, query_mask = left_pad([p[2] for p in chunk], PAD_ID, device)
            ctx = queries.shape[1]
            sampled, lp = sample_responses(actor, queries, query_mask, c["MAX_NEW_TOKENS"], c["TEMPERATURE"],
                                           stop_ids, PAD_ID, sync_stop)
            responses, mask = truncate_after_eos(sampled, stop_ids, PAD_ID)
            qr, am = torch.cat([queries, responses], 1), torch.cat([query_mask, mask], 1)
            ended = ends_with_stop(responses, mask, stop_ids)
            ref_lp = frozen_forward(ref, response_logprobs, qr, am, ctx, c["TEMPERATURE"])
            replies = [tok.decode(r[m].tolist(), skip_special_tokens=True) for r, m in zip(responses.cpu(), mask.cpu())]
            out["rm"] += scorer(qr, am, ctx, chunk, replies, ended.tolist()).tolist()
            out["kl"] += torch.where(mask, kl_per_token(lp, ref_lp, "k1"), 0.0).sum(1).tolist()
            out["len"] += mask.sum(1).tolist()
            out["eos"] += ended.float().tolist()
            out["replies"] += replies
    out["gold"] = gold([p[1] for p in mine], out["replies"]) if gold else [None] * len(mine)
    out = {k: all_gather_list(v) for k, v in out.items()}
    res = {"rm_score": float(np.mean(out["rm"])), "kl": float(np.mean(out["kl"])),
           "resp_length": float(np.mean(out["len"])), "eos_frac": float(np.mean(out["eos"]))}
    if gold:
        res["gold_score"] = float(np.mean(out["gold"]))
    return res, out


# ---- the loop -------------------------------------------------------------------------------------------------------
def train(c):
    """The whole run for the resolved config `c` ({NAME: value}); returns the summary dict (rank 0) or None."""
    run = Run(c)  # processes, batch sizes, the four roles, prompts, resume or the first evaluation (plumbing, below)
    if run.state.step >= c["TOTAL_STEPS"]:  # resumed a finished run: nothing to do, nothing written
        return None
    with run:  # writes into OUTPUT_DIR; on every way out the CSV is closed and the signal handlers restored
        for step in run.steps():
            prompts = run.next_prompts()  # this rank's share of the next rollout batch, from a fresh shuffle each pass
            beta = run.kl_ctl.value
            row, batch = ppo_step(run.roles, prompts, beta, c, run.sizes, run.score_moments, run.gold)
            if math.isfinite(row["objective/kl"]):  # step 8: β from this batch's mean KL per reply, all ranks (OAI)
                run.kl_ctl.update(row["objective/kl"], run.sizes.rollout)
            run.record(step, row, batch, prompts)  # evaluation when due, CSV row, samples; stops after bad steps
            if run.checkpoint_or_stop(step):  # checkpoint when due; True after Ctrl-C / SIGTERM
                break
    return run.finish()  # evaluation after training, saved models, summary.json


# =======================================================================================================================
# PLUMBING: what a run needs around the algorithm. Nothing below changes what PPO computes.
# =======================================================================================================================


# ---- batch sizes and config checks ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BatchSizes:
    """The batch sizes of a run, derived once from the config and the number of processes (LLaMA-Factory's scheme)."""
    rollout: int   # replies per PPO step, all processes: MINI_BATCH_SIZE × GRAD_ACCUM × PPO_BUFFER_SIZE
    per_rank: int  # replies per PPO step on each process
    samples: int   # replies per prompt (SAMPLES_PER_PROMPT), consecutive and on one process
    micro: int     # sequences per forward/backward: MINI_BATCH_SIZE
    accum: int     # micro-batches per optimizer step on each process: GRAD_ACCUM / processes
    world: int     # processes

    def describe(self):
        prompts = f"replies ({self.rollout // self.samples} prompts x {self.samples})" if self.samples > 1 else "prompts"
        return (f"rollout batch {self.rollout} {prompts} per PPO step ({self.per_rank} per process); each epoch "
                f"{self.rollout // (self.micro * self.accum * self.world)} optimizer steps of "
                f"{self.micro * self.accum * self.world} sequences, {self.accum} micro-batches of {self.micro} "
                f"per process")


def batch_sizes(c, world):
    """BatchSizes for `world` processes, checked in one place: every division exact, one message each."""
    if c["GRAD_ACCUM"] % world:
        raise ConfigError(f"GRAD_ACCUM = {c['GRAD_ACCUM']} does not divide by the {world} processes: set "
                          f"--grad_accum to a multiple of {world} (the rollout batch, MINI_BATCH_SIZE x GRAD_ACCUM x "
                          f"PPO_BUFFER_SIZE, is shared out over the processes)")
    rollout, n = c["MINI_BATCH_SIZE"] * c["GRAD_ACCUM"] * c["PPO_BUFFER_SIZE"], c["SAMPLES_PER_PROMPT"]
    if (rollout // world) % n:
        raise ConfigError(f"SAMPLES_PER_PROMPT = {n} does not divide the {rollout // world} replies per process (rollout "
                          f"batch MINI_BATCH_SIZE x GRAD_ACCUM x PPO_BUFFER_SIZE = {rollout} over {world} processes): a "
                          f"prompt's replies stay on one process; make MINI_BATCH_SIZE a multiple of {n}")
    return BatchSizes(rollout=rollout, per_rank=rollout // world, samples=n, micro=c["MINI_BATCH_SIZE"],
                      accum=c["GRAD_ACCUM"] // world, world=world)


def lr_schedule(optimizer, c):
    """LR_SCHEDULE through transformers' get_scheduler, stepped once per optimizer step: WARMUP_STEPS steps of linear
    warm-up from 0, then constant, or a linear or cosine decay to 0 at the run's last optimizer step (TOTAL_STEPS x
    PPO_EPOCHS x PPO_BUFFER_SIZE of them: each epoch makes PPO_BUFFER_SIZE optimizer steps)."""
    from transformers import get_scheduler
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[c["LR_SCHEDULE"]]
    return get_scheduler(name, optimizer, num_warmup_steps=c["WARMUP_STEPS"],
                         num_training_steps=c["TOTAL_STEPS"] * c["PPO_EPOCHS"] * c["PPO_BUFFER_SIZE"])


def check_config(c):
    """The bounds every setting must respect (batch sizes are derived and checked in batch_sizes)."""
    for k in ("MINI_BATCH_SIZE", "GRAD_ACCUM", "PPO_BUFFER_SIZE", "PPO_EPOCHS", "MAX_NEW_TOKENS", "MAX_PROMPT_TOKENS"):
        if c[k] < 1:
            raise ConfigError(f"{k} = {c[k]} must be a positive integer")
    for k in ("TOTAL_STEPS", "EVAL_EVERY", "SAMPLE_EVERY", "EVAL_SIZE", "SAVE_EVERY"):
        if c[k] < 0:
            raise ConfigError(f"{k} = {c[k]} must be >= 0")
    if c["KEEP_CHECKPOINTS"] < 1 or c["MAX_BAD_STEPS"] < 1:
        raise ConfigError("KEEP_CHECKPOINTS and MAX_BAD_STEPS must be >= 1")
    for k in ("PPO_TARGET", "TEMPERATURE", "KL_HORIZON", "LEARNING_RATE"):
        if not c[k] > 0:
            raise ConfigError(f"{k} = {c[k]} must be > 0")
    for k in ("INIT_KL_COEF", "CLIP_RANGE", "CLIP_RANGE_VALUE", "VF_COEF", "MAX_GRAD_NORM", "SCORE_CLIP",
              "MISSING_EOS_PENALTY", "WEIGHT_DECAY"):
        if c[k] < 0:
            raise ConfigError(f"{k} = {c[k]} must be >= 0")
    if c["ADVANTAGE"] not in ("gae", "grpo", "rloo", "reinforce++"):
        raise ConfigError(f"ADVANTAGE = {c['ADVANTAGE']!r} must be gae, grpo, rloo or reinforce++")
    if c["SAMPLES_PER_PROMPT"] < (2 if c["ADVANTAGE"] in ("grpo", "rloo") else 1):
        raise ConfigError(f"SAMPLES_PER_PROMPT = {c['SAMPLES_PER_PROMPT']} is too few for ADVANTAGE = "
                          f"{c['ADVANTAGE']!r}: " + ("its baseline is the other replies to the same prompt; use 2 or "
                                                     "more (4-16 is usual)" if c["ADVANTAGE"] in ("grpo", "rloo")
                                                     else "use 1 or more"))
    if c["KL_IN"] not in ("reward", "loss"):
        raise ConfigError(f"KL_IN = {c['KL_IN']!r} must be 'reward' or 'loss'")
    if c["KL_ESTIMATOR"] not in ("k1", "k3"):
        raise ConfigError(f"KL_ESTIMATOR = {c['KL_ESTIMATOR']!r} must be 'k1' or 'k3'")
    if not 0 <= c["LAM"] <= 1 or not 0 <= c["GAMMA"] <= 1:
        raise ConfigError("GAMMA and LAM must lie in [0, 1]")
    if c["LORA_R"] < 0 or not c["LORA_ALPHA"] > 0:
        raise ConfigError(f"LORA_R = {c['LORA_R']} must be >= 0 (0 = off) and LORA_ALPHA = {c['LORA_ALPHA']} > 0")
    if c["LR_SCHEDULE"] not in ("constant", "linear", "cosine") or c["WARMUP_STEPS"] < 0:
        raise ConfigError(f"LR_SCHEDULE = {c['LR_SCHEDULE']!r} must be constant, linear or cosine, and WARMUP_STEPS "
                          f"= {c['WARMUP_STEPS']} >= 0")
    if c["DTYPE"] not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"DTYPE = {c['DTYPE']!r} must be auto, float32, bfloat16 or float16")


# ---- run setup and resume -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunState:
    """What a run changes as it goes: all a checkpoint needs besides models, optimizer and RNG states."""
    config: dict
    kl_coef: float
    step: int = 0
    order: list = dataclasses.field(default_factory=list)  # this pass's prompt order ...
    cursor: int = 0                                        # ... and the position in it
    rows: list = dataclasses.field(default_factory=list)   # the CSV rows so far
    eval_points: list = dataclasses.field(default_factory=list)
    eval_before: dict = None
    detail_before: dict = None
    score_moments: dict = None
    bad_streak: int = 0                                    # steps in a row with non-finite numbers
    timing: dict = dataclasses.field(default_factory=lambda: {"generate": 0.0, "score": 0.0, "train": 0.0,
                                                              "eval": 0.0})
    wall_s: float = 0.0                                    # earlier sessions of this run + this one


class Run:
    """A run's plumbing around the loop in train(): setting up (processes, batch sizes, the four roles, prompts,
    resume or the first evaluation: nothing is written yet, so a bad input leaves earlier outputs intact), writing
    (`with run:` opens the CSV and installs the Ctrl-C / SIGTERM handler; leaving it closes and restores both, on
    every exit path), recording each step, checkpoints, and the end of the run."""

    def __init__(self, c):
        check_config(c)
        self.c = c
        self.rank, world, self.device = setup_distributed(c)
        self.sizes = batch_sizes(c, world)
        self.master = self.rank == 0  # only rank 0 prints, shows the bar and writes files
        self.log = print if self.master else (lambda *a, **k: None)
        self.dtype = pick_dtype(c["DTYPE"], self.device)
        self.metrics_dir, self.model_dir, self.ckpt_dir = (os.path.join(c["OUTPUT_DIR"], d) for d in
                                                           ("ppo_metrics", "ppo_model", "checkpoints"))
        check_writable(c["OUTPUT_DIR"], self.metrics_dir, self.rank)
        random.seed(c["SEED"]), np.random.seed(c["SEED"]), torch.manual_seed(c["SEED"])
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

        self.roles = roles = load_roles(c, self.device, self.dtype)
        roles.actor_train, roles.critic_train = wrap_for_training(roles.actor, roles.critic, c, self.device)
        roles.fsdp = dist_on() and c["DISTRIBUTED"] == "fsdp"
        roles.params = trainable_parameters([m for m in (roles.actor_train, roles.critic_train) if m is not None])
        # one AdamW over actor and critic, as N+ and TRL-new (PolicyAndValueWrapper): one step, one gradient clip;
        # fused: one kernel for all parameters instead of a loop over tensors (4x faster on the demo's CPU step)
        roles.optimizer = torch.optim.AdamW(roles.params, lr=c["LEARNING_RATE"], eps=c["ADAM_EPS"],
                                            weight_decay=c["WEIGHT_DECAY"],
                                            fused=self.device.type in ("cpu", "cuda") and not roles.fsdp)
        roles.scheduler = lr_schedule(roles.optimizer, c)
        self.kl_ctl = AdaptiveKLController(c["INIT_KL_COEF"], c["PPO_TARGET"], c["KL_HORIZON"], c["ADAPTIVE_KL"])
        self.score_moments = RunningMoments() if c["SCORE_NORM"] else None
        self.gold = load_score_fn(c["GOLD_REWARD"], "GOLD_REWARD") if c["GOLD_REWARD"] else None
        self.dashboards = Dashboards(c["REPORT_TO"])  # checks the packages now; opened when writing starts
        self.load_data()
        self.describe()
        self.state = RunState(config={k: c[k] for k in CONFIG_KEYS}, kl_coef=self.kl_ctl.value)
        self.t_session = time.perf_counter()
        self.prompt_rng = torch.Generator().manual_seed(c["SEED"])  # the same prompt order on every rank
        self.resume_path, self.move_aside = choose_checkpoint(c, self.ckpt_dir, self.log)
        if self.resume_path:
            self.resume()
        else:
            torch.manual_seed(c["SEED"] + self.rank)  # each rank samples its own replies
            if self.eval_prompts:  # before anything is written: a failing gold file leaves earlier outputs intact
                self.state.eval_before, self.state.detail_before = self.evaluate(0)
                self.state.eval_points.append(self.state.eval_before)
                self.log("eval before:", json.dumps({k: round(v, 3) for k, v in self.state.eval_before.items()}))

    def load_data(self):
        """Prompt-only data (the 'output' field is never read); prompt + reply must fit every model reading actor
        tokens. Evaluation: EVAL_SIZE prompts, an equal share per rank."""
        c, roles = self.c, self.roles
        budget, why = prompt_budget(c, [("ACTOR_MODEL", roles.actor), ("REF_MODEL", roles.ref)]
                                    + ([("CRITIC_MODEL", roles.critic.model)] if roles.critic is not None else [])
                                    + ([("REWARD_MODEL", roles.rm.model.model)] if roles.rm and roles.rm.same_tokenizer
                                       else []))
        self.prompts = load_prompts(c["PROMPT_FILE"], roles.tok, budget, "PROMPT_FILE", self.log, why)
        if len(self.prompts) < self.sizes.rollout // self.sizes.samples:
            raise ConfigError(f"PROMPT_FILE has {len(self.prompts)} usable prompts, fewer than one rollout batch "
                              f"({self.sizes.rollout // self.sizes.samples}); add prompts or lower MINI_BATCH_SIZE")
        ev = load_prompts(c["EVAL_FILE"], roles.tok, budget, "EVAL_FILE", self.log, why) if c["EVAL_FILE"] else []
        ev = ev[:c["EVAL_SIZE"]] if c["EVAL_SIZE"] else ev
        self.eval_prompts = ev[:len(ev) // self.sizes.world * self.sizes.world]

    def describe(self):
        """Print the resolved config, derived sizes, notes and models; keep them for config.json and the summary."""
        c, roles, tok = self.c, self.roles, self.roles.tok
        ref_path = c["REF_MODEL"] or c["ACTOR_MODEL"]
        self.derived = {"ROLLOUT_BATCH": self.sizes.rollout, "PER_RANK_BATCH": self.sizes.per_rank,
                        "PROMPTS_PER_STEP": self.sizes.rollout // self.sizes.samples,
                        "world_size": self.sizes.world, "device": str(self.device),
                        "dtype": str(self.dtype).replace("torch.", ""), "REF_MODEL": ref_path,
                        "CRITIC_MODEL": roles.critic_path, "threads": torch.get_num_threads()}
        self.log("config:", " ".join(f"{k}={c[k]!r}" for k in CONFIG_KEYS))
        self.log("derived:", " ".join(f"{k}={v}" for k, v in self.derived.items()))
        self.log("batch:", self.sizes.describe())
        for n in roles.notes:
            self.log("note:", n)
        self.log("stop tokens (a reply ends at any):",
                 ", ".join(f"{tok.convert_ids_to_tokens(i)!r} ({i})" for i in roles.stop_ids))
        trained = sum(p.numel() for p in roles.params)
        reward = ("a function" if roles.rm is None else "model, same tokenizer" if roles.rm.same_tokenizer else
                  "model, own tokenizer (re-tokenising replies)" + (", own pooling" if roles.rm.model.own_pooling else ""))
        reward += " + REWARD_FN" if c["REWARD_FN"] else ""
        lora = f" (LoRA rank {c['LORA_R']}: adapters and value head)" if roles.adapters else ""
        shared = [f"{name} = {of} with its adapters off" for name, role, of in
                  (("reference", roles.ref, "actor"), ("reward", roles.rm and roles.rm.model, "critic"))
                  if isinstance(role, AdaptersOff)]
        critic_params = roles.critic.model.num_parameters() if roles.critic is not None else 0
        critic = f"critic {critic_params:,}" if roles.critic is not None else f"no critic ({c['ADVANTAGE']})"
        self.log(f"models: actor {roles.actor.num_parameters():,} params, {critic}; trained {trained:,}{lora}"
                 f", reward {reward}; "
                 f"prompts: {len(self.prompts)} train, {len(self.eval_prompts)} eval")
        for line in shared:
            self.log(f"note: the {line} (LoRA: one model in memory for both roles)")
        self.models = {"actor": c["ACTOR_MODEL"], "reference": ref_path, "reward": c["REWARD_MODEL"],
                       "critic": roles.critic_path, "actor_params": roles.actor.num_parameters(),
                       "critic_params": critic_params, "trained_params": trained,
                       "roles_loaded": ["actor", "reference", "reward"] + (["critic"] if roles.critic is not None else []),
                       "advantage": c["ADVANTAGE"],
                       "lora": {"r": c["LORA_R"], "alpha": c["LORA_ALPHA"], "target_modules": c["LORA_TARGET_MODULES"],
                                "shared": shared} if roles.adapters else None,
                       "reward_fn": c["REWARD_FN"] or None, "reward_is_function": roles.rm is None,
                       "reward_same_tokenizer": bool(roles.rm and roles.rm.same_tokenizer),
                       "reward_own_pooling": bool(roles.rm and roles.rm.model.own_pooling),
                       "stop_tokens": {tok.convert_ids_to_tokens(i): i for i in roles.stop_ids}}
        self.data = {"prompt_file": c["PROMPT_FILE"], "train_prompts": len(self.prompts),
                     "eval_file": c["EVAL_FILE"], "eval_prompts": len(self.eval_prompts)}
        self.files = {"curves": os.path.join(self.metrics_dir, "training_curves.png"),
                      "metrics_csv": os.path.join(self.metrics_dir, "training_metrics.csv"),
                      "config": os.path.join(self.metrics_dir, "config.json"),
                      "samples": os.path.join(self.metrics_dir, "samples.jsonl"),
                      "checkpoints": self.ckpt_dir, "model": self.model_dir if c["SAVE_MODEL"] else None}

    def resume(self):
        saved = read_checkpoint(self.resume_path, "state.pt")
        load_trained_state(self.roles, saved["models"], saved["optimizer"])
        if "scheduler" in saved:  # checkpoints before LR_SCHEDULE had a constant rate: the new default
            self.roles.scheduler.load_state_dict(saved["scheduler"])
        self.state = RunState(**{f.name: saved[f.name] for f in dataclasses.fields(RunState) if f.name != "config"},
                              config=self.state.config)
        self.kl_ctl.value = self.state.kl_coef
        if self.score_moments is not None and self.state.score_moments:
            self.score_moments.__dict__.update(self.state.score_moments)
        set_rng_state(saved["rng"][self.rank], self.prompt_rng)
        self.log(f"resuming from {self.resume_path}: step {self.state.step}, β {self.kl_ctl.value:.4f}")
        if self.state.step >= self.c["TOTAL_STEPS"]:
            self.log(f"the run in {self.c['OUTPUT_DIR']} already has {self.state.step} steps (TOTAL_STEPS = "
                     f"{self.c['TOTAL_STEPS']}); extend it with --total_steps=N, or start over with --resume=never")

    def evaluate(self, step):
        """Held-out evaluation (timed; its RNG does not touch the run's): (results with the step, per-prompt detail)."""
        t0 = time.perf_counter()
        with autocast(self.device, self.dtype):
            res, detail = evaluate(self.roles.actor, self.roles.ref, self.roles.scorer, self.roles.tok,
                                   self.roles.stop_ids, self.eval_prompts, self.c, self.device, self.gold,
                                   self.c["SEED"] + 1, self.roles.fsdp)
        self.state.timing["eval"] += time.perf_counter() - t0
        detail["prompts"] = [p[0] for p in self.eval_prompts]
        return dict(res, step=step), detail

    # -- writing: from here on the run writes into OUTPUT_DIR --
    def __enter__(self):
        c, state = self.c, self.state
        self.csv_file = self.writer = None
        if self.master:
            # dashboards first: a login or network failure is one line before any earlier output is touched
            self.dashboards.open(c["OUTPUT_DIR"], {"config": state.config, "derived": self.derived})
            if not self.resume_path and state.eval_before:
                self.dashboards.log(eval_columns(state.eval_before), 0)
            if self.move_aside:
                aside = f"{self.ckpt_dir}_before_{time.strftime('%Y%m%d-%H%M%S')}"
                os.replace(self.ckpt_dir, aside)
                self.log(f"note: the earlier checkpoints are kept in {aside}")
            atomic_write(self.files["config"], lambda f: json.dump({"config": state.config, "derived": self.derived},
                                                                   f, indent=1))
            if not self.resume_path and os.path.exists(self.files["samples"]):
                os.remove(self.files["samples"])
            # the rows so far (from the checkpoint), then appended row by row: a crash loses at most the step in flight
            path = self.files["metrics_csv"]
            self.csv_file = open(path + ".tmp", "w", newline="", encoding="utf-8")
            if state.rows:
                self.write_rows(state.rows)
            os.replace(path + ".tmp", path)
        self.stop = StopFlag(self.log)
        self.last_saved = state.step if self.resume_path else -1
        self.bar = tqdm(range(state.step + 1, c["TOTAL_STEPS"] + 1), desc="PPO", dynamic_ncols=True,
                        disable=not self.master, initial=state.step, total=c["TOTAL_STEPS"])
        return self

    def __exit__(self, *exc):
        self.bar.close()
        if exc[0] is not None:  # otherwise finish() logs the evaluation after training, then closes them
            self.dashboards.close()
        self.stop.restore()
        if self.csv_file:
            self.csv_file.close()
        return False

    def steps(self):
        return self.bar

    def next_prompts(self):
        """This rank's share of the next rollout batch; a fresh shuffle of the prompts each pass (same on all ranks).
        With SAMPLES_PER_PROMPT = n each prompt comes n times in a row, and a prompt's n replies are on one rank."""
        self.t_step = time.perf_counter()
        state, n = self.state, self.sizes.samples
        per_step, per_rank = self.sizes.rollout // n, self.sizes.per_rank // n  # prompts
        if state.cursor + per_step > len(state.order):
            state.order, state.cursor = torch.randperm(len(self.prompts), generator=self.prompt_rng).tolist(), 0
        start = state.cursor + self.rank * per_rank
        state.cursor += per_step
        return [self.prompts[i] for i in state.order[start:start + per_rank] for _ in range(n)]

    def record(self, step, row, batch, prompts):
        """Complete the step's row (METRICS order), evaluate when due, write the CSV row and samples, update the
        bar; stop with TrainingDiverged after MAX_BAD_STEPS steps in a row with non-finite numbers."""
        c, state, roles = self.c, self.state, self.roles
        row.update({"step": step, "episodes": step * self.sizes.rollout})
        if dist_on():  # every rank must hold the same β and (DDP) the same weights; FSDP shards differ by design
            seen = all_gather_list([(self.kl_ctl.value, None if roles.fsdp else
                                     params_checksum(roles.trained().values()))])
            row["dist/ranks_in_sync"] = float(all(x == seen[0] for x in seen))
        for k in ("generate", "score", "train"):
            state.timing[k] += row[f"time/{k}_s"]
        if self.eval_prompts and c["EVAL_EVERY"] and step % c["EVAL_EVERY"] == 0 and step < c["TOTAL_STEPS"]:
            ev, _ = self.evaluate(step)
            state.eval_points.append(ev)
            row.update(eval_columns(ev))
        row["time/step_s"] = time.perf_counter() - self.t_step  # the whole step: phases, metrics, gold, evaluation
        row = metrics_row(row)
        state.rows.append(row)
        state.step = step
        bad = row["train/bad_scores"] > 0 or row["train/skipped_frac"] > 0
        state.bad_streak = state.bad_streak + 1 if bad else 0
        if self.master:
            self.write_rows([row])
            self.dashboards.log(row, step)
            if c["SAMPLE_EVERY"] and (step == 1 or step % c["SAMPLE_EVERY"] == 0):
                samples = [{"step": step, "prompt": p[0], "reply": r, "score": round(sc, 4)}
                           for p, r, sc in list(zip(prompts, batch["replies"], batch["scores"].tolist()))[:4]]
                with open(self.files["samples"], "a", encoding="utf-8") as f:
                    f.writelines(json.dumps(x) + "\n" for x in samples)
                self.dashboards.samples(samples, step)
            self.bar.set_postfix(score=f"{row['objective/scores']:.2f}", kl=f"{row['objective/kl']:.2f}",
                                 beta=f"{row['objective/kl_coef']:.3f}",
                                 **({"gold": f"{row['objective/gold_scores']:.2f}"} if self.gold else {}))
        if state.bad_streak >= c["MAX_BAD_STEPS"]:
            kept = list_checkpoints(self.ckpt_dir)
            raise TrainingDiverged(
                f"{state.bad_streak} PPO steps in a row had a non-finite score, loss or gradient (step {step}); "
                f"the last good checkpoint is {kept[-1] if kept else 'none'}: lower LEARNING_RATE or check the "
                f"reward model, then resume")
        self.bad = bad

    def write_rows(self, rows):
        if self.writer is None:
            self.writer = csv.DictWriter(self.csv_file, fieldnames=list(rows[0]))
            self.writer.writeheader()
        self.writer.writerows(rows)
        self.csv_file.flush()

    def checkpoint_or_stop(self, step):
        """Checkpoint every SAVE_EVERY steps, at the end, and when asked to stop (never right after a bad step);
        returns True when Ctrl-C / SIGTERM asked to stop (on any rank)."""
        c = self.c
        interrupted = self.stop.any_rank()
        if not self.bad and (interrupted or step == c["TOTAL_STEPS"] or (c["SAVE_EVERY"] and step % c["SAVE_EVERY"] == 0)):
            self.checkpoint()
            self.last_saved = step
            if self.master and not interrupted and step < c["TOTAL_STEPS"]:
                write_reports(self.summary("running"), self.state, self.metrics_dir, c)
        return interrupted

    def tick(self):
        now = time.perf_counter()
        self.state.wall_s += now - self.t_session
        self.t_session = now

    def checkpoint(self):
        self.tick()
        self.state.kl_coef = self.kl_ctl.value
        self.state.score_moments = dict(self.score_moments.__dict__) if self.score_moments is not None else None
        return save_checkpoint(self.ckpt_dir, self.c["KEEP_CHECKPOINTS"], self.state, self.roles, self.prompt_rng,
                               self.master)

    def summary(self, status, eval_after=None, detail_after=None):
        return build_summary(status, self.state, self.c, self.derived, self.roles.notes, self.models, self.data,
                             self.files, eval_after, detail_after)

    def finish(self):
        """After the loop: an interrupted run writes its summary and the command that resumes it; a finished one is
        evaluated, saves its models and writes summary.json and the curves."""
        with contextlib.closing(self.dashboards):  # W&B / TensorBoard: the evaluation after training, then closed
            c, state = self.c, self.state
            if self.stop.signum or state.step < c["TOTAL_STEPS"]:
                saved = "saved" if self.last_saved == state.step else "not saved"
                self.log(f"interrupted after step {state.step}; checkpoint {saved}; continue with: {resume_command(c)}")
                if self.master:
                    self.tick()
                    summary = self.summary("interrupted")
                    summary["interrupted_by"] = signal.Signals(self.stop.signum).name if self.stop.signum else None
                    write_reports(summary, state, self.metrics_dir, c)
                return {"status": "interrupted", "signum": self.stop.signum}
            eval_after, detail_after = None, None
            if self.eval_prompts:
                eval_after, detail_after = self.evaluate(c["TOTAL_STEPS"])
                state.eval_points.append(eval_after)
                self.log("eval after: ", json.dumps({k: round(v, 3) for k, v in eval_after.items()}))
                if self.master:
                    self.dashboards.log(eval_columns(eval_after), c["TOTAL_STEPS"])
            if c["SAVE_MODEL"]:
                save_models(self.roles, self.model_dir, self.master)
            if dist_on():
                torch.distributed.barrier()
            if not self.master:
                return None
            self.tick()
            summary = self.summary("finished", eval_after, detail_after)
            write_reports(summary, state, self.metrics_dir, c)
            self.log("health:\n  " + "\n  ".join(summary["health"]))
            self.log(f"done in {summary['wall_time_s']:.0f}s; read {self.metrics_dir}/summary.json, then "
                     f"training_curves.png, then training_metrics.csv")
            return summary


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"DEVICE = {name!r} but CUDA is not available here; use --device=cpu or --device=auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("DEVICE = 'mps' but MPS is not available here; use --device=cpu or --device=auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"DEVICE = {name!r} is not a device name; use auto, cpu, cuda, cuda:N or mps") from None


def pick_dtype(name, device):
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def check_writable(output_dir, metrics_dir, rank):
    try:
        os.makedirs(metrics_dir, exist_ok=True)
        probe = os.path.join(metrics_dir, f".write_test{rank}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"OUTPUT_DIR {output_dir!r} is not writable ({e.strerror}); pick another with "
                          f"--output_dir=...") from None


# ---- checkpoints and interrupts: everything needed to continue a run exactly ----------------------------------------
def rng_state(prompt_rng):
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "prompt_order": prompt_rng.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, prompt_rng):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    prompt_rng.set_state(state["prompt_order"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trained_state(roles):
    """(model state, optimizer state) of what trains: actor + critic, under LoRA their adapters and value head only
    (the frozen base is the model on disk). Under FSDP gathered in full to the CPU (a collective)."""
    pair = torch.nn.ModuleDict(roles.trained())
    if not roles.fsdp:
        model_state, optim_state = pair.state_dict(), roles.optimizer.state_dict()
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        model_state, optim_state = get_state_dict(pair, roles.optimizer,
                                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if roles.adapters:
        trained = {name for name, p in pair.named_parameters() if p.requires_grad}
        model_state = {k: v for k, v in model_state.items() if k in trained}
    return model_state, optim_state


def load_trained_state(roles, model_state, optim_state):
    pair = torch.nn.ModuleDict(roles.trained())
    if not roles.fsdp:
        pair.load_state_dict(model_state, strict=not roles.adapters)  # LoRA: the frozen base is not in the file
        roles.optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    set_state_dict(pair, roles.optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True, strict=not roles.adapters))


def list_checkpoints(ckpt_dir):
    """Finished checkpoints, oldest first (a half-written one still has its .tmp name and is ignored)."""
    if not os.path.isdir(ckpt_dir):
        return []
    names = sorted(n for n in os.listdir(ckpt_dir) if re.fullmatch(r"step_\d{8}", n))
    return [os.path.join(ckpt_dir, n) for n in names if os.path.isfile(os.path.join(ckpt_dir, n, "meta.json"))]


def save_checkpoint(ckpt_dir, keep, state, roles, prompt_rng, master):
    """Write OUTPUT_DIR/checkpoints/step_XXXXXXXX/state.pt (models, optimizer, every rank's RNG, the RunState)
    atomically (a .tmp folder, then rename); keep the newest `keep`. Every rank takes part (its RNG state; FSDP
    gathers the shards); rank 0 writes."""
    model_state, optim_state = trained_state(roles)
    rngs = all_gather_list([rng_state(prompt_rng)])
    step = state.step
    if master:
        final = os.path.join(ckpt_dir, f"step_{step:08d}")
        tmp = final + ".tmp"
        os.makedirs(tmp, exist_ok=True)
        torch.save({"models": model_state, "optimizer": optim_state, "scheduler": roles.scheduler.state_dict(),
                    "rng": rngs, **vars(state)},
                   os.path.join(tmp, "state.pt"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:  # read without loading the weights
            json.dump({"step": step, "config": state.config}, f, indent=1)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(old)
    if dist_on():
        torch.distributed.barrier()
    return os.path.join(ckpt_dir, f"step_{step:08d}")


def read_checkpoint(path, name):
    """meta.json (step and config, read without the weights) or state.pt of a checkpoint; a damaged one is one line."""
    file = os.path.join(path, name)
    try:
        if name == "state.pt":
            return torch.load(file, map_location="cpu", weights_only=False)
        with open(file, encoding="utf-8") as f:
            return dict(json.load(f))
    except Exception as e:  # a file on disk that a crash or a copy damaged
        raise ConfigError(f"checkpoint {path}: {name} cannot be read ({first_line(e)}); move that folder away to "
                          f"resume from an earlier checkpoint, or --resume=never") from None


def config_differences(saved, c):
    """Settings that differ between a checkpoint's config and this run's, ignoring those a resume may change. A
    setting newer than the checkpoint counts only when set away from its default: every new setting's default keeps
    what the earlier release computed, so a run started before an upgrade resumes after it."""
    return [f"{k} {saved.get(k)!r} -> {c[k]!r}" for k in CONFIG_KEYS
            if k not in RESUMABLE_CHANGES and saved.get(k) != c[k] and (k in saved or c[k] != globals()[k])]


def choose_checkpoint(c, ckpt_dir, log):
    """RESUME: "never"; "auto" = the newest checkpoint of this output folder when its config matches (otherwise
    start fresh, with the old checkpoints moved aside, never deleted); or a path that must match.
    Returns (checkpoint path or None, whether old checkpoints must be moved aside)."""
    if c["RESUME"] == "never":
        return None, bool(list_checkpoints(ckpt_dir))
    if c["RESUME"] != "auto":
        path = c["RESUME"]
        path = path if os.path.isfile(os.path.join(path, "state.pt")) else (list_checkpoints(path) or [path])[-1]
        if not os.path.isfile(os.path.join(path, "state.pt")):
            raise ConfigError(f"RESUME {c['RESUME']!r} holds no checkpoint (a step_XXXXXXXX folder with state.pt); "
                              f"give one, or --resume=auto / --resume=never")
        diff = config_differences(read_checkpoint(path, "meta.json").get("config", {}), c)
        if diff:
            raise ConfigError(f"checkpoint {path} comes from a different config ({'; '.join(diff[:3])}); resume with "
                              f"its settings, or start over with --resume=never")
        return path, False
    found = list_checkpoints(ckpt_dir)
    if not found:
        return None, False
    diff = config_differences(read_checkpoint(found[-1], "meta.json").get("config", {}), c)
    if not diff:
        return found[-1], False
    log(f"note: not resuming {found[-1]}: the config changed ({'; '.join(diff[:3])}); starting fresh")
    return None, True


class StopFlag:
    """Ctrl-C / SIGTERM: the first asks to stop after the step in flight (checkpoint and reports are written);
    a second stops at once."""

    def __init__(self, log):
        self.signum, self.log = 0, log
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        self.log(f"\n{signal.Signals(signum).name}: stopping after this step (again to stop at once)")

    def any_rank(self):
        return bool(all_reduce_sum(torch.tensor([self.signum], device=DIST_DEVICE)).item()) if dist_on() \
            else bool(self.signum)

    def restore(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)


def resume_command(c):
    """The command that continues this run: RESUME=auto finds the checkpoint, the overrides are those of this run."""
    args = [f"--{k.lower()}={c[k]}" for k in CONFIG_KEYS if c[k] != globals()[k]]
    launcher = "torchrun --nproc_per_node N" if dist_on() else "python"
    return " ".join([launcher, "code/ppo.py"] + args)


def save_models(roles, model_dir, master):
    """save_pretrained of actor and critic, each beside the actor's tokenizer, as models a user loads and runs as they
    are: the tokenizer as loaded (its pad a real token), the actor's generation_config ending replies at the run's
    stop tokens, no id of the trainer's own. Under FSDP the full weights are gathered to rank 0 first.
    Under LoRA the adapters are saved in peft's format (actor_adapter, critic_adapter: PeftModel.from_pretrained on
    the base model) and actor and critic as plain models: the base loaded again on the CPU with the saved adapters
    merged in (W + B·A·alpha/r, in the base's dtype), so the saved model is the saved adapter by construction."""
    actor, tok, stop_ids = roles.actor, roles.tok, roles.stop_ids
    actor.generation_config.eos_token_id = stop_ids[0] if len(stop_ids) == 1 else list(stop_ids)
    actor.generation_config.pad_token_id = tok.pad_token_id
    for name, m in [("actor", actor)] + ([("critic", roles.critic.model)] if roles.critic is not None else []):
        adapter = roles.adapters.get(name)
        state = None
        if roles.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            state = get_model_state_dict(adapter.peft if adapter else m,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not master:
            continue
        if adapter:
            from peft import PeftModel
            folder = os.path.join(model_dir, f"{name}_adapter")
            adapter.peft.save_pretrained(folder, state_dict=state)
            m, state = PeftModel.from_pretrained(adapter.load_base(), folder).merge_and_unload(), None
            m.generation_config, m.config.pad_token_id = actor.generation_config, tok.pad_token_id
        m.save_pretrained(os.path.join(model_dir, name), state_dict=state)
        tok.save_pretrained(os.path.join(model_dir, name))


# ---- reporting: the metrics table, CSV rows, curves, summary with health verdicts -----------------------------------
# Every metric a run logs, named once: how it is reduced, the curve panel that plots it (title, label) or None, and
# whether summary.json summarises it ("max" / "min": which end is best). The CSV columns (in this order), the curves,
# the summary and the health verdicts all read this table. Reductions: "once" = the same number on every rank;
# "batch" = mean over the rollout batch of all ranks; "micro" = mean over the micro-batches of the step and the ranks;
# "optim" = mean over the optimizer steps and ranks; "time" = seconds (or tokens/s), mean over ranks; "eval" = the
# held-out evaluation at EVAL_EVERY steps, NaN in between; "dist" = only under torchrun.
REWARD, KL_PANEL, CLIP = "reward", "KL to reference (nats/reply)", "clipfrac and approx KL"
METRICS = {
    "step": ("once", None, None),
    "episodes": ("once", None, None),
    "objective/scores": ("batch", (REWARD, "RM score"), "max"),
    "objective/rlhf_reward": ("batch", (REWARD, "RLHF reward"), None),
    "objective/non_score_reward": ("batch", None, None),
    "objective/kl": ("batch", (KL_PANEL, "KL"), "max"),
    "objective/entropy": ("batch", None, "max"),
    "objective/kl_coef": ("once", ("β (KL coefficient)", "β"), "max"),
    "objective/gold_scores": ("batch", (REWARD, "gold score"), "max"),
    "policy/approxkl_avg": ("micro", (CLIP, "approx KL"), "max"),
    "policy/clipfrac_avg": ("micro", (CLIP, "policy clipfrac"), "max"),
    "policy/entropy_avg": ("micro", ("entropy (nats/token)", "entropy"), "max"),
    "loss/policy_avg": ("micro", ("policy loss", "policy"), "max"),
    "loss/value_avg": ("micro", ("value loss", "value"), "min"),
    "val/clipfrac_avg": ("micro", (CLIP, "value clipfrac"), None),
    "val/ratio": ("micro", None, None),
    "loss/kl_avg": ("micro", ("policy loss", "k3 KL term (KL_IN = loss)"), None),
    "policy/grad_norm": ("optim", None, None),
    "train/skipped_frac": ("optim", None, None),
    "val/explained_var": ("batch", None, "max"),
    "val/mean_value": ("batch", None, None),
    "resp/length_mean": ("batch", ("reply length (tokens)", "length"), "max"),
    "resp/eos_frac": ("batch", None, "max"),
    "resp/repetition": ("batch", None, "max"),
    "lr": ("once", None, None),
    "time/generate_s": ("time", None, None),
    "time/score_s": ("time", None, None),
    "time/train_s": ("time", None, None),
    "time/tokens_per_s": ("time", None, None),
    "eval/rm_score": ("eval", None, None),
    "eval/gold_score": ("eval", None, None),
    "eval/kl": ("eval", None, None),
    "train/bad_scores": ("once", None, None),
    "dist/ranks_in_sync": ("dist", None, None),
    "time/step_s": ("time", None, None),
}
PANELS = [REWARD, KL_PANEL, "β (KL coefficient)", "policy loss", "value loss", CLIP, "entropy (nats/token)",
          "reply length (tokens)"]  # the figure's order; a last panel shows the held-out evaluation


def eval_columns(ev):
    """A held-out evaluation as the CSV's eval/ columns."""
    return {"eval/rm_score": ev["rm_score"], "eval/gold_score": ev.get("gold_score", float("nan")), "eval/kl": ev["kl"]}


class Dashboards:
    """REPORT_TO: TensorBoard (OUTPUT_DIR/tensorboard) and/or Weights & Biases (project $WANDB_PROJECT, default
    ppo-rlhf, files under OUTPUT_DIR/wandb; WANDB_MODE=offline needs no network), rank 0 only, beside the CSV that is
    always written: the config at start, every CSV column each step under the CSV's (TRL's) names, the evaluations
    (eval/ columns, also at steps 0 and TOTAL_STEPS), and the samples as a table. A resumed run continues the
    TensorBoard folder and starts a new W&B run."""
    INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}

    def __init__(self, report_to):
        self.names = [n.strip().lower() for n in report_to.split(",") if n.strip().lower() not in ("", "none")]
        for n in self.names:
            if n not in self.INSTALL:
                raise ConfigError(f"REPORT_TO = {report_to!r}: {n!r} is not one of none, tensorboard, wandb "
                                  f"(comma-separated for both)")
            if importlib.util.find_spec(n) is None:
                raise ConfigError(f"REPORT_TO={n} needs the {n} package: {self.INSTALL[n]} (or --report_to=none)")
        self.tb = self.wb = None

    def open(self, output_dir, config):
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            self.tb.add_text("config", "    " + json.dumps(config, indent=1).replace("\n", "\n    "))
        if "wandb" in self.names:
            import wandb
            try:
                self.wb = wandb.init(project=os.environ.get("WANDB_PROJECT", "ppo-rlhf"), dir=output_dir,
                                     config=config)
            except Exception as e:  # no login, no network: the user's setup, reported in one line
                self.close()
                raise ConfigError(f"REPORT_TO=wandb: wandb.init failed ({first_line(e)}); run `wandb login`, or set "
                                  f"WANDB_MODE=offline to log to files (wandb sync later)") from None

    def log(self, row, step):
        if not (self.tb or self.wb):
            return
        values = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wb:
            self.wb.log(values, step=step)

    def samples(self, samples, step):
        cells = [[json.dumps(x["prompt"], ensure_ascii=False), x["reply"], x["score"]] for x in samples]
        if self.tb:
            self.tb.add_text("samples", "| prompt | reply | score |\n|---|---|---|\n" + "\n".join(
                "| " + " | ".join(str(v).replace("|", "/").replace("\n", " ") for v in row) + " |" for row in cells), step)
        if self.wb:
            import wandb
            self.wb.log({"samples": wandb.Table(columns=["prompt", "reply", "score"], data=cells)}, step=step)

    def close(self):
        if self.tb:
            self.tb.close()
        if self.wb:
            self.wb.finish()
        self.tb = self.wb = None


def metrics_row(values):
    """The CSV row of one step: every metric of METRICS in its order (an evaluation column not measured this step
    is NaN; dist/ columns exist only under torchrun). A value that METRICS does not declare is a bug."""
    undeclared = set(values) - set(METRICS)
    assert not undeclared, f"metrics missing from METRICS: {sorted(undeclared)}"
    return {name: values.get(name, float("nan")) for name, (reduce, _, _) in METRICS.items()
            if name in values or reduce == "eval"}


def atomic_write(path, write):
    """write(f) into path.tmp, then rename: a reader never sees half a file, a crash never corrupts the old one."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        write(f)
    os.replace(tmp, path)


def smooth(series):
    """Centred rolling mean over ~1/20 of the run (no lag, unlike an EMA); NaN gaps are skipped."""
    return series.rolling(max(1, len(series) // 20), center=True, min_periods=1).mean()


def plot_curves(df, path, target, eval_points):
    """One figure, read at a glance: smoothed lines over faint raw points, one panel per PANELS entry (the metrics
    METRICS assigns to it), and the held-out evaluation."""
    fig, axes = plt.subplots(3, 3, figsize=(15, 11))
    x = df["step"]
    for ax, title in zip(axes.flat, PANELS):
        series = [(name, panel[1]) for name, (_, panel, _) in METRICS.items() if panel and panel[0] == title]
        for i, (col, label) in enumerate(series):
            if col not in df or df[col].isna().all():
                continue
            color = f"C{i}"
            ax.plot(x, df[col], ".", color=color, alpha=0.25, markersize=3)
            ax.plot(x, smooth(df[col]), "-", color=color, label=label, linewidth=1.8)
        if title == KL_PANEL:
            ax.axhline(target, color="k", linestyle="--", linewidth=1, label=f"target {target:g}")
        ax.set_title(title)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    ax = axes.flat[-1]
    ax.set_title("held-out evaluation")
    ax.set_xlabel("PPO step")
    ax.grid(alpha=0.3)
    if eval_points:
        steps = [p["step"] for p in eval_points]
        for i, key in enumerate(("rm_score", "gold_score", "kl")):
            if key in eval_points[0]:
                ax.plot(steps, [p[key] for p in eval_points], "o-", color=f"C{i}", label=key.replace("_", " "))
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("PPO-RLHF training curves")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def health_verdicts(df, target, eval_before, eval_after, rm="RM"):
    """Plain-language verdicts drawn from the run: what looks fine and what to check. rm names the reward's source
    ("RM", or "reward-function" when REWARD_MODEL is a .py file)."""
    if len(df) == 0:
        return ["no PPO step finished"]
    k = max(1, len(df) // 10)
    first, last = df.iloc[:k], df.iloc[-k:]

    def f(part, col):  # mean of a METRICS column over part of the run; NaN where it was never measured
        assert col in METRICS, col
        return float(part[col].mean()) if col in part and part[col].notna().any() else float("nan")
    out = []
    kl = f(last, "objective/kl")
    if f(df, "objective/kl") < -0.5 or kl < -0.5:
        out.append(f"WARNING: mean KL is negative ({kl:.2f}): sampling and scoring disagree; check that generation "
                   f"uses plain temperature sampling (no top-k/top-p) and the same TEMPERATURE as the logprobs")
    elif abs(kl - target) <= 0.5 * target:
        out.append(f"OK: KL {kl:.2f} nats/reply is near the target {target:g} (β now {f(last, 'objective/kl_coef'):.3f})")
    elif kl > target:
        out.append(f"CHECK: KL {kl:.2f} is above the target {target:g}: the policy drifts from the reference faster than "
                   f"β can follow; lower LEARNING_RATE or KL_HORIZON")
    else:
        out.append(f"OK: KL {kl:.2f} is below the target {target:g}: the policy stays close to the reference "
                   f"(β is falling to allow more)" if kl >= 0 else f"CHECK: KL {kl:.2f} is slightly negative")
    s0, s1 = f(first, "objective/scores"), f(last, "objective/scores")
    out.append(f"{'OK' if s1 > s0 else 'CHECK'}: {rm} score {'rose' if s1 > s0 else 'did not rise'} from {s0:.2f} "
               f"to {s1:.2f}")
    e0, e1 = f(first, "policy/entropy_avg"), f(last, "policy/entropy_avg")
    if e1 < 0.3 * e0:
        out.append(f"WARNING: entropy collapsed from {e0:.2f} to {e1:.2f} nats/token: the policy is nearly "
                   f"deterministic; raise INIT_KL_COEF or lower LEARNING_RATE")
    l0, l1 = f(first, "resp/length_mean"), f(last, "resp/length_mean")
    if l1 < 0.5 * l0 or l1 < 3:
        out.append(f"WARNING: replies shrank from {l0:.1f} to {l1:.1f} tokens: possible reward hacking by short replies")
    r0, r1 = f(first, "resp/repetition"), f(last, "resp/repetition")
    if r1 > r0 + 0.1:
        out.append(f"WARNING: repetition rose from {r0:.2f} to {r1:.2f} (复读机): the reward model pays for repeats; "
                   f"keep the KL leash (ADAPTIVE_KL, INIT_KL_COEF) or fix the reward model")
    cf = f(last, "policy/clipfrac_avg")
    if cf > 0.3:
        out.append(f"CHECK: clipfrac {cf:.2f} is high: updates hit the trust region often; lower LEARNING_RATE or "
                   f"PPO_EPOCHS")
    ev = f(last, "val/explained_var")
    if ev < 0:
        out.append(f"CHECK: value explained variance {ev:.2f} < 0: the critic predicts returns worse than their mean")
    n_bad = int((df["train/bad_scores"] > 0).sum()) if "train/bad_scores" in df else 0
    n_skip = int((df["train/skipped_frac"] > 0).sum()) if "train/skipped_frac" in df else 0
    if n_bad or n_skip:
        out.append(f"WARNING: non-finite numbers: {n_bad} steps had a NaN/Inf score (not trained on), {n_skip} steps "
                   f"skipped updates for a NaN/Inf loss or gradient; check the reward model, lower LEARNING_RATE")
    if "dist/ranks_in_sync" in df and (df["dist/ranks_in_sync"] < 1).any():
        out.append("WARNING: the ranks' weights or β diverged at some step (dist/ranks_in_sync = 0); results are not "
                   "those of one consistent model")
    g0, g1 = f(first, "objective/gold_scores"), f(last, "objective/gold_scores")
    if not math.isnan(g0):
        # over-optimisation: the RM score climbs while the gold score falls or stands still, in training or held out
        pairs = [("training", s0, s1, g0, g1)]
        if eval_before and eval_after and "gold_score" in eval_before:
            pairs.append(("held out", eval_before["rm_score"], eval_after["rm_score"], eval_before["gold_score"],
                          eval_after["gold_score"]))
        hacked = [f"{name}: {rm} {rm0:.2f} -> {rm1:.2f}, gold {gd0:.2f} -> {gd1:.2f}"
                  for name, rm0, rm1, gd0, gd1 in pairs if rm1 > rm0 + 0.5 and gd1 < gd0 + 0.2]
        if hacked:
            out.append(f"WARNING: the {rm} score rose but the gold score did not ({'; '.join(hacked)}): "
                       f"over-optimisation of the reward (reward hacking); keep the KL leash tighter "
                       f"(ADAPTIVE_KL, a lower PPO_TARGET, a larger INIT_KL_COEF) or stop earlier")
        else:
            out.append(f"{'OK' if g1 >= g0 else 'CHECK'}: gold score {g0:.2f} -> {g1:.2f}")
    if eval_before and eval_after:
        out.append(f"held-out {rm} score {eval_before['rm_score']:.2f} -> {eval_after['rm_score']:.2f}"
                   + (f", gold {eval_before['gold_score']:.2f} -> {eval_after['gold_score']:.2f}"
                      if "gold_score" in eval_before else "")
                   + f", KL {eval_after['kl']:.2f}")
    return out


def summarise(df, key, best):
    """A metric over the run: mean of the first and last tenth, and its best value (max or min, from METRICS)."""
    if key not in df or df[key].notna().sum() == 0:
        return None
    k = max(1, len(df) // 10)
    col = df[key].dropna()
    return {"start": float(col.iloc[:k].mean()), "end": float(col.iloc[-k:].mean()),
            "best": float(col.max() if best == "max" else col.min())}


def build_summary(status, state, c, derived, notes, models, data, files, eval_after=None, detail_after=None):
    """summary.json: the run at a glance, health verdicts first."""
    df = pd.DataFrame(state.rows)
    eval_before, detail_before = state.eval_before, state.detail_before
    samples = []
    if detail_before and detail_after:
        for i in range(min(8, len(detail_before["replies"]))):
            samples.append({"prompt": detail_before["prompts"][i],
                            "reply_before": detail_before["replies"][i], "reply_after": detail_after["replies"][i],
                            "rm_before": round(detail_before["rm"][i], 3), "rm_after": round(detail_after["rm"][i], 3),
                            "gold_before": detail_before["gold"][i], "gold_after": detail_after["gold"][i]})
    return {
        "status": status,
        "health": health_verdicts(df, c["PPO_TARGET"], eval_before, eval_after,
                                  "reward-function" if models.get("reward_is_function") else "RM"),
        "eval_before": eval_before, "eval_after": eval_after, "eval_points": state.eval_points,
        "metrics": {k: summarise(df, k, best) for k, (_, _, best) in METRICS.items() if best},
        "steps": state.step, "episodes": state.step * derived["ROLLOUT_BATCH"],
        "wall_time_s": round(state.wall_s, 2),
        "time_split_s": {k: round(v, 2) for k, v in state.timing.items()},
        "step_time_s_median": float(df["time/step_s"].median()) if len(df) else None,
        "resume_command": resume_command(c) if status != "finished" else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # Linux: KiB
        "models": models, "data": data, "samples": samples, "files": files,
        "config": {k: c[k] for k in CONFIG_KEYS}, "derived": derived, "notes": notes,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
    }


def write_reports(summary, state, metrics_dir, c):
    """summary.json and training_curves.png, each written atomically."""
    if state.rows:
        plot_curves(pd.DataFrame(state.rows), os.path.join(metrics_dir, "training_curves.png"), c["PPO_TARGET"],
                    state.eval_points)
    atomic_write(os.path.join(metrics_dir, "summary.json"), lambda f: json.dump(summary, f, indent=1))


# ---- command line: --name=value overrides, --help -------------------------------------------------------------------
def config_comments():
    """{NAME: comment} read from the config block above, so --help is the config block itself."""
    out = {}
    with open(os.path.abspath(__file__), encoding="utf-8") as f:
        for line in f:
            m = re.match(r"^([A-Z][A-Z0-9_]*) = .*?#\s*(.*)$", line)
            if m and m.group(1) in CONFIG_KEYS:
                out[m.group(1)] = m.group(2)
    return out


def parse_value(name, text, default):
    """Parse `text` with the type of the constant's default value."""
    if isinstance(default, bool):
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{name.lower()}={text}: expected true or false")
    try:
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        raise ConfigError(f"--{name.lower()}={text}: expected {type(default).__name__} like {default!r}") from None
    return text


def parse_overrides(argv, config):
    """`--name=value` (case-insensitive names) -> {NAME: typed value}. Unknown names name their close matches."""
    out = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"cannot read argument {arg!r}: overrides look like --total_steps=100 (see --help)")
        name, text = arg[2:].split("=", 1)
        key = name.upper().replace("-", "_")
        if key not in config:
            close = difflib.get_close_matches(key, list(config), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join('--' + c.lower() for c in close)}?" if close else "; see --help"
            raise ConfigError(f"unknown setting --{name}{hint}")
        out[key] = parse_value(key, text, config[key])
    return out


def print_help(config):
    print(__doc__.split("\n\n")[0] + "\n\nSettings (--name=value; the default follows each name):")
    comments = config_comments()
    for k in CONFIG_KEYS:
        print(f"  --{k.lower():<22} {config[k]!r:<28} {comments.get(k, '')}")


def resolve_config(argv):
    config = {k: globals()[k] for k in CONFIG_KEYS}
    if any(a in ("-h", "--help") for a in argv):
        try:
            print_help(config)
            sys.stdout.flush()
        except BrokenPipeError:  # the reader stopped early (--help | head): end quietly, as command-line tools do;
            # stdout goes to devnull so that the interpreter's last flush at exit does not fail again (Python docs)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    config.update(parse_overrides(argv, config))
    return config


def main(argv):
    """Exit codes: 0 done, 2 bad input, 3 diverged (non-finite numbers), 130 / 143 stopped by Ctrl-C / SIGTERM."""
    say = (lambda msg: print(msg, file=sys.stderr)) if os.environ.get("RANK", "0") == "0" else (lambda msg: None)
    try:
        result = train(resolve_config(argv))
        return 128 + result["signum"] if result and result.get("status") == "interrupted" and result["signum"] else 0
    except ConfigError as e:
        say(f"error: {e}")
        return 2
    except TrainingDiverged as e:
        say(f"error: {e}")
        return 3
    except KeyboardInterrupt:
        say("\nstopped at once; the newest checkpoint in OUTPUT_DIR/checkpoints resumes the run (RESUME=auto)")
        return 130
    finally:
        if dist_on():
            torch.distributed.destroy_process_group()


def leave(code):
    """End the process with exit code `code`. A torchrun worker ends without the interpreter's finalization: when
    Python finalizes, any other thread that asks for the GIL is ended by CPython on the spot, and gloo's worker
    threads can still be dropping the last collective's tensors (which needs the GIL). A thread ended inside a C++
    destructor is std::terminate: SIGABRT, "terminate called without an active exception", the whole torchrun
    failed, in about 1 of 100 runs of the torchrun tests here (issue 15; the rank that exits right after the final
    barrier, while rank 0 still writes its reports). Every file the run writes is closed before this point."""
    if "RANK" in os.environ:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


# ---- distributed: under torchrun every reduction spans all ranks; in one process each is the identity ---------------
def dist_on():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size():
    return torch.distributed.get_world_size() if dist_on() else 1


def all_reduce_sum(t):
    if dist_on():
        torch.distributed.all_reduce(t)
    return t


def all_mean(values):
    """{name: float} averaged over ranks, so every rank logs (and acts on) the same numbers."""
    if not dist_on():
        return values
    keys = list(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    t = all_reduce_sum(t.to(DIST_DEVICE)) / torch.distributed.get_world_size()
    return dict(zip(keys, t.tolist()))


def all_gather_list(items):
    """Concatenate a Python list across ranks, in rank order."""
    if not dist_on():
        return items
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, items)
    return [x for part in out for x in part]


DIST_DEVICE = torch.device("cpu")  # where collectives run: the rank's GPU under NCCL, set in train()


def setup_distributed(c):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK (nanoGPT-style detection); a plain `python` run is one process.
    Returns (rank, world, device)."""
    global DIST_DEVICE
    if "RANK" not in os.environ:
        return 0, 1, pick_device(c["DEVICE"])
    if c["DISTRIBUTED"] not in ("ddp", "fsdp"):
        raise ConfigError(f"DISTRIBUTED = {c['DISTRIBUTED']!r} must be 'ddp' or 'fsdp'")
    device = pick_device(c["DEVICE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    DIST_DEVICE = device if device.type == "cuda" else torch.device("cpu")
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def wrap_for_training(actor, critic, c, device):
    """Under torchrun: DDP (a full copy per rank, gradients all-reduced) or FSDP2 (fully_shard: parameters, gradients
    and optimizer state sharded over ranks, each decoder layer gathered when used). Returns the modules the training
    forward calls; rollout and evaluation call the plain (or, under FSDP, sharded) modules directly."""
    if not dist_on():
        return actor, critic
    if c["DISTRIBUTED"] == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return (torch.nn.parallel.DistributedDataParallel(actor, device_ids=ids),
                torch.nn.parallel.DistributedDataParallel(critic, device_ids=ids) if critic is not None else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (world_size(),))
    for root, hf_model in [(actor, actor)] + ([(critic, critic.model)] if critic is not None else []):
        layer_classes = set(getattr(hf_model, "_no_split_modules", None) or [])
        for m in hf_model.modules():
            if type(m).__name__ in layer_classes:
                fully_shard(m, mesh=mesh)
        fully_shard(root, mesh=mesh)
    return actor, critic


def params_checksum(modules):
    """One number per rank that differs when the ranks' parameters differ (DDP must keep them identical): the sum of
    every parameter's bit patterns read as integers, wrapping around. Integer sums do not depend on the order of the
    reduction, so equal weights give equal sums on any kernel, and a one-ulp change shows. No copy is made (an fp64
    sum copies each tensor first: 4.4 GB for a 7B model's embedding)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    with torch.no_grad():
        sums = [p.detach().reshape(-1).view(ints[p.element_size()]).sum(dtype=ints[p.element_size()]).long()
                for m in modules for p in m.parameters()]
        return sum(torch.stack(sums).tolist())


if __name__ == "__main__":
    leave(main(sys.argv[1:]))
