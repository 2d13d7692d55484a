"""PPO for RLHF, the lesson in one file: Actor, Reference, Reward and Critic, from rollout to clipped update.

    python code/ppo.py                              # the offline demo: ~3 min on 2 CPU cores
    python code/ppo.py --total_steps=50 --temperature=0.7
    python code/ppo.py --help                       # every constant below, with its comment

One PPO step (ppo_step) = 1 rollout (sample replies to a batch of prompts, with the actor's logprobs) · 2 truncate
at EOS + masks · 3 reference logprobs, critic values · 4 reward-model scores · 5 per-token KL-penalised rewards ·
6 GAE advantages (or, without a critic, a baseline from the other replies: ADVANTAGE) · 7 PPO epochs of clipped
policy + value updates over minibatches · 8 log, adapt the KL coefficient β. The file reads in that order: the
config, the derived batch sizes, the PPO math, the forwards, steps 1-8, the evaluation and the loop (train).
Two modules beside it hold what this file imports and never change what PPO computes:
    code/loading.py    what the run loads: models, tokenizers, stop tokens, LoRA, reward scorers, prompt files
    code/plumbing.py   around the loop: config, threads, resume, checkpoints, CSV, curves, summary, health, torchrun

Everything the run writes goes under OUTPUT_DIR, read in this order:
    ppo_metrics/summary.json          the run at a glance: before/after evaluation, health verdicts, time, memory
    ppo_metrics/training_curves.png   reward, KL against its target, β, losses, clipfrac, entropy, lengths
    ppo_metrics/training_metrics.csv  one row per PPO step (TRL's metric names where TRL has one; plumbing.METRICS)
    ppo_metrics/config.json, samples.jsonl, worked_example.md,  ppo_model/actor, ppo_model/critic,  checkpoints/
README.md explains outputs, settings and errors; "implementation details #k" is docs/ppo-implementation-details.md.
"""
import contextlib
import dataclasses
import math
import sys
import time

import numpy as np
import torch

from loading import (PAD_ID, ConfigError, frozen_forward, left_pad, last_index, load_prompt_files, load_roles,
                     load_score_fn, model_inputs, position_ids_of, trainable_parameters)
from plumbing import (Run, all_gather_list, all_mean, all_reduce_sum, dist_on, diversity, entropy_floor,
                      gradient_sync, group_rows, hold_output_dir, leave, lr_schedule, main, merge_rollouts, peak_memory,
                      save_models, setup, world_size, wrap_for_training)

_IMPORTED = set(globals())  # names above the config block (PAD_ID is the trainer's, not a setting)

# ---- config (edit me, or override any constant as --name=value) -----------------------------------------------------
# models: the four roles
ACTOR_MODEL = "data/models/demo-sft"     # Actor (policy, trained): SFT causal LM, local path or hub name
REF_MODEL = ""                           # Reference (frozen SFT copy for the KL leash); "" = ACTOR_MODEL
REWARD_MODEL = "data/models/demo-rm"     # Reward model (frozen judge): a sequence-classification model, or a .py
REWARD_FN = ""                           # a .py file whose score(prompts, responses) is added to the reward
SCORE_TIMEOUT = 600.0                    # seconds one score() call of a .py file may take (0 = no bound)
REWARD_LABEL = ""                        # the reward model's output to use when it has several: index or label name
CRITIC_MODEL = ""                        # Critic (value model, trained; its score head is the value head); "" = RM
# data
PROMPT_FILE = "data/ppo_prompts.json"    # JSON, JSONL or Parquet prompts (Alpaca, chat, ShareGPT); outputs unused
MAX_PROMPT_TOKENS = 128                  # longer prompts are dropped, with a warning (7B: 512-1024)
# generation
MAX_NEW_TOKENS = 48                      # reply length limit in tokens (7B: 256-512)
TEMPERATURE = 1.0                        # sampling temperature, also applied to every logprob (7B: 0.7-1.0)
MISSING_EOS_PENALTY = 0.0                # subtracted from the score of a reply cut off without EOS (0 = off; TRL)
STOP_TOKENS = ""                         # tokens that end a reply, comma-separated; "" = the model's EOS ids
# PPO
TOTAL_STEPS = 250                        # PPO steps = rollout batches (7B: a few hundred to a few thousand)
MINI_BATCH_SIZE = 8                      # sequences per forward/backward (per process)
GRAD_ACCUM = 1                           # micro-batches per optimizer step
PPO_BUFFER_SIZE = 2                      # optimizer steps per PPO epoch (7B: 1); see "derived batch sizes" below
PPO_EPOCHS = 4                           # passes over each rollout batch (7B: 4)
PPO_TARGET = 6.0                         # KL target of the adaptive controller, nats per reply (7B: 6.0)
ADAPTIVE_KL = True                       # adapt β towards PPO_TARGET (OAI); False keeps β = INIT_KL_COEF
INIT_KL_COEF = 0.1                       # initial β, the KL coefficient (TRL-old 0.2, OAI 0.15, N+ 0.05 fixed)
KL_HORIZON = 1000                        # controller horizon in episodes; smaller adapts faster (7B: 10000, OAI)
KL_ESTIMATOR = "k1"                      # per-token KL in the reward: "k1" = logp - logp_ref, "k3" = (r-1) - log r
ADVANTAGE = "gae"                        # "gae" (the Critic, 4 roles); critic-free: "grpo", "rloo", "reinforce++"
SAMPLES_PER_PROMPT = 1                   # replies sampled per prompt, kept together (grpo and rloo need >= 2)
GRPO_STD = True                          # grpo: divide by the group's std (False: Dr. GRPO, the mean only)
KL_IN = "reward"                         # where β·KL goes: "reward" (per-token penalty, OAI) or "loss" (k3, GRPO)
GAMMA = 1.0                              # discount in GAE
LAM = 0.95                               # GAE λ
CLIP_RANGE = 0.2                         # ε of the clipped surrogate objective
CLIP_RANGE_VALUE = 0.2                   # clip of the value update around the rollout values (reward units)
VF_COEF = 0.1                            # weight of the value loss in the joint loss
ENTROPY_COEF = 0.2                       # entropy bonus: this x (floor - entropy) in the loss, below it (0 = off)
ENTROPY_FLOOR = 0.85                     # the floor: this x step 1's entropy (0 = none: -ENTROPY_COEF x entropy)
# beyond the seed (README, "Beyond the seed"): each off by default, the defaults compute what the seed's PPO does
LOSS_AGG = "token-mean"                  # how losses average: token-mean, seq-mean-token-mean/-sum/-sum-norm
CLIP_RANGE_HIGH = 0.0                    # DAPO clip-higher: the ratio's upper bound is 1 + this (0 = CLIP_RANGE)
DUAL_CLIP = 0.0                          # dual-clip c > 1: for A < 0 the policy loss is capped at -c·A (0 = off)
RATIO_LEVEL = "token"                    # "token", or "sequence" (GSPO: one ratio per reply, clipped per reply)
SEQ_CLIP_RANGE = 4e-4                    # the clip range of a reply's ratio when RATIO_LEVEL = "sequence" (GSPO)
CRITIC_WARMUP_STEPS = 0                  # first PPO steps that train the critic only; the actor and β stay put
CRITIC_LEARNING_RATE = 0.0               # the critic's AdamW rate (0 = LEARNING_RATE)
OVERLONG_BUFFER = 0                      # DAPO: the last N tokens before MAX_NEW_TOKENS cost up to OVERLONG_PENALTY
OVERLONG_PENALTY = 0.0                   # DAPO: the score penalty of a reply MAX_NEW_TOKENS long (0 = off)
MASK_TRUNCATED = False                   # replies cut off without a stop token take no part in the loss (TRL)
DYNAMIC_SAMPLING = False                 # DAPO: groups whose replies all scored the same are replaced by new ones
MAX_EXTRA_ROLLOUTS = 3                   # DAPO: extra sampling rounds a step may take to fill its batch that way
SCORE_NORM = False                       # whiten RM scores with running mean/std before use (PPO-max)
SCORE_CLIP = 0.0                         # clip scores to ±this after normalisation (0 = off; PPO-max 10)
# optimisation
LEARNING_RATE = 3e-5                     # AdamW, actor and critic (7B: 1e-6)
LR_SCHEDULE = "constant"                 # "constant", "linear" or "cosine" decay to 0 over the run's optimizer steps
WARMUP_STEPS = 0                         # optimizer steps of linear warm-up from 0 before the schedule
ADAM_EPS = 1e-5                          # AdamW ε (N+ and OAI use 1e-5; PyTorch default 1e-8)
WEIGHT_DECAY = 0.0                       # AdamW weight decay
MAX_GRAD_NORM = 1.0                      # clip the joint gradient norm of actor + critic (0 = off)
MAX_BAD_STEPS = 3                        # stop after this many steps in a row with a non-finite score, loss or grad
SEED = 0                                 # seeds python, numpy and torch: a CPU run is repeatable
DEVICE = "auto"                          # "auto" = cuda, then mps, then cpu; or "cpu", "cuda", "cuda:1", "mps"
DTYPE = "auto"                           # "auto" = bf16 on a GPU, else float32; bfloat16 is faster on AVX512-BF16 CPUs
THREADS = "auto"                         # CPU threads: "auto" = the cores not busy with other programs at start; or N
GRADIENT_CHECKPOINTING = False           # recompute activations in the backward: less memory, one more forward
OFFLOAD_FROZEN = False                   # keep reference and reward model on the CPU between uses (frees GPU memory)
DISTRIBUTED = "ddp"                      # under torchrun: "ddp" (a copy per GPU) or "fsdp" (FSDP2: shard them)
# LoRA (needs peft): train low-rank adapters; Reference, Reward model and a critic of the actor share the frozen bases
LORA_R = 0                               # adapter rank; 0 = off: full fine-tuning (7B on one GPU: 16-64)
LORA_ALPHA = 32                          # adapter scale: a layer's update is B·A·LORA_ALPHA/LORA_R
LORA_TARGET_MODULES = "all-linear"       # layers given adapters: "all-linear" (but the output head), or names
# evaluation
EVAL_FILE = "data/ppo_eval.json"         # held-out prompts, same format; "" = no evaluation
EVAL_EVERY = 50                          # evaluate every this many steps, and before and after (0 = only those)
EVAL_SIZE = 200                          # held-out prompts used (0 = all)
GOLD_REWARD = "data/demo_gold_reward.py" # file with score(prompts, responses) -> list[float]; never trained on
# output
OUTPUT_DIR = "output"                    # ppo_metrics/ and ppo_model/ go here
SAMPLE_EVERY = 25                        # write a few rollout samples to samples.jsonl every this many steps
REPORT_TO = "none"                       # also log to "tensorboard", "wandb" or "tensorboard,wandb" (rank 0)
SAVE_MODEL = True                        # save the final actor and critic to OUTPUT_DIR/ppo_model/
SAVE_EVERY = 50                          # checkpoint (models, optimizer, RNG, data position, metrics) every N steps
KEEP_CHECKPOINTS = 2                     # newest checkpoints kept in OUTPUT_DIR/checkpoints/
RESUME = "auto"                          # "auto" = the newest checkpoint of the same config; "never"; or a path

CONFIG_KEYS = [k for k in list(globals()) if k.isupper() and k not in _IMPORTED and not k.startswith("_")]
DEFAULTS = {k: globals()[k] for k in CONFIG_KEYS}  # the constants above, before any --name=value
INVALID_LOGPROB = 1.0  # at masked (post-EOS) slots of both logprob tensors, so every KL estimator gives 0 there (N+)


# ---- derived batch sizes (LLaMA-Factory's scheme), checked once -----------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BatchSizes:
    """The batch sizes of a run, derived once from the config and the number of processes."""
    rollout: int   # replies per PPO step, all processes: MINI_BATCH_SIZE × GRAD_ACCUM × PPO_BUFFER_SIZE
    per_rank: int  # replies per PPO step on each process
    samples: int   # replies per prompt (SAMPLES_PER_PROMPT), consecutive and on one process
    micro: int     # sequences per forward/backward: MINI_BATCH_SIZE
    accum: int     # micro-batches per optimizer step on each process: GRAD_ACCUM / processes
    world: int     # processes


def batch_sizes(c, world):
    """BatchSizes for `world` processes, checked in one place: every division exact, one message each."""
    if c["GRAD_ACCUM"] % world:
        raise ConfigError(f"GRAD_ACCUM = {c['GRAD_ACCUM']} does not divide by the {world} processes: set "
                          f"--grad_accum to a multiple of {world} (the rollout batch, MINI_BATCH_SIZE x GRAD_ACCUM x "
                          f"PPO_BUFFER_SIZE, is shared out over the processes)")
    rollout, n = c["MINI_BATCH_SIZE"] * c["GRAD_ACCUM"] * c["PPO_BUFFER_SIZE"], c["SAMPLES_PER_PROMPT"]
    if (rollout // world) % n:
        raise ConfigError(f"SAMPLES_PER_PROMPT = {n} does not divide the {rollout // world} replies per process "
                          f"(rollout batch MINI_BATCH_SIZE x GRAD_ACCUM x PPO_BUFFER_SIZE = {rollout} over {world} "
                          f"processes): a prompt's replies stay on one process; make MINI_BATCH_SIZE a multiple of {n}")
    return BatchSizes(rollout=rollout, per_rank=rollout // world, samples=n, micro=c["MINI_BATCH_SIZE"],
                      accum=c["GRAD_ACCUM"] // world, world=world)


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
#             github.com/OpenLMLab/MOSS-RLHF (MOSS: the same code)
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


def aggregate(x, mask, agg="token-mean", max_len=1):
    """One loss from per-token values x [B, T] over the real tokens (mask), LOSS_AGG (veRL's loss_agg_mode):
        token-mean               Σ x / Σ tokens of this micro-batch (today's; N+, TRL's PPO)
        seq-mean-token-mean      mean over replies of each reply's token mean (GRPO, Shao et al. 2024)
        seq-mean-token-sum       mean over replies of each reply's token sum
        seq-mean-token-sum-norm  mean over replies of token sum / max_len, a constant (MAX_NEW_TOKENS; Dr. GRPO, Liu
                                 et al. 2025: no length bias; veRL divides the sum over replies by the padded width)
    The seq-mean modes do not depend on the split into equal micro-batches or processes; token-mean (N+, TRL)
    weights a token by 1 / its micro-batch's token count, so it does."""
    if agg == "token-mean":
        return masked_mean(x, mask)
    sums = torch.where(mask, x, 0.0).sum(1)
    if agg == "seq-mean-token-mean":
        return (sums / mask.sum(1).clamp(min=1)).mean()
    if agg == "seq-mean-token-sum":
        return sums.mean()
    if agg == "seq-mean-token-sum-norm":
        return sums.mean() / max_len
    raise ValueError(f"unknown loss aggregation {agg!r}")


def overlong_penalty(lengths, max_len, buffer, penalty):
    """DAPO's soft overlong punishment (Yu et al. 2025, "DAPO", arXiv:2503.14476), added to the score: 0 up to
    max_len - buffer tokens, then falling linearly to -penalty at max_len. lengths: [B] reply lengths."""
    over = (lengths.float() - (max_len - buffer)).clamp(min=0)
    return -penalty * over / max(buffer, 1)


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


def compute_advantages(rewards, values, mask, estimator="gae", gamma=1.0, lam=0.95, n=1, scale_std=True):
    """Step 6 for ADVANTAGE = estimator. Returns (advantages, returns); returns (the critic's targets) is None
    without a critic. n: SAMPLES_PER_PROMPT; scale_std: GRPO_STD.
    gae:         GAE against the critic's values, whitened over the batch (N+, TRL)
    reinforce++: token-level returns-to-go of the KL-shaped reward (GAE with V = 0, λ = 1), whitened over the batch
                 of all ranks (Hu 2025, "REINFORCE++", arXiv:2501.03262)
    grpo, rloo:  the reply's total reward against its group's (group_advantages), on every token of the reply"""
    if estimator == "gae":
        advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
        return masked_whiten(advantages, mask), returns
    if estimator == "reinforce++":
        returns_to_go, _ = compute_gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)
        return masked_whiten(returns_to_go, mask), None
    seq = group_advantages(torch.where(mask, rewards, 0.0).sum(1), n, estimator, scale_std)
    return torch.where(mask, seq[:, None], 0.0), None


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range=0.2, clip_high=0.0, dual_clip=0.0,
                ratio_level="token", agg="token-mean", max_len=1):
    """The clipped surrogate objective (Schulman et al. 2017), as a loss to minimise:
        L = -E_t[min(r_t·A_t, clip(r_t, 1-ε, 1+ε)·A_t)],  r_t = π_θ(a_t|s_t) / π_old(a_t|s_t)
    min is the pessimistic choice: a big advantage cannot push the ratio past 1±ε, and a wrong step is pulled back.
    Written as max of the negated terms, averaged by `agg` (aggregate). Variants, all off by default:
        clip_high   DAPO's clip-higher (Yu et al. 2025): the upper bound 1 + clip_high (0: 1 + ε), room for
                    unlikely tokens to grow
        dual_clip   for A < 0 the loss is capped at -dual_clip·A (Ye et al. 2020, arXiv:1912.09729; > 1): a ratio
                    far above 1 on a bad token cannot make the loss unbounded
        ratio_level "sequence": GSPO (Zheng et al. 2025, arXiv:2507.18071), one ratio per reply, exp of the mean
                    per-token log-ratio of the reply, clipped per reply
    Returns (loss, stats): clipfrac (share of tokens where the clip is active; below and above 1 apart), approxkl
    (k2 = ½·mean(log r²) per token, Schulman's estimate of KL(π_old‖π_θ)), mean ratio."""
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)
    ratio = torch.exp(log_ratio if ratio_level == "token" else
                      torch.where(mask, masked_mean(log_ratio, mask, 1)[:, None], 0.0))
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + (clip_high or clip_range))
    losses = torch.max(pg_losses, pg_losses_clipped)
    if dual_clip:
        losses = torch.where(advantages < 0, torch.min(losses, -dual_clip * advantages), losses)
    loss = aggregate(losses, mask, agg, max_len)
    with torch.no_grad():
        clipped = pg_losses_clipped > pg_losses
        stats = {"clipfrac": masked_mean(clipped.float(), mask),
                 "clipfrac_low": masked_mean((clipped & (ratio < 1)).float(), mask),
                 "clipfrac_high": masked_mean((clipped & (ratio > 1)).float(), mask),
                 "approxkl": 0.5 * masked_mean(log_ratio ** 2, mask),
                 "ratio": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values, old_values, returns, mask, clip_range=0.2, agg="token-mean", max_len=1):
    """Clipped value loss: ½·E[max((V - R)², (clip(V, V_old ± c) - R)²)] (OAI, N+, TRL), averaged by `agg`.
    Returns (loss, clipfrac)."""
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    losses = (values - returns) ** 2
    losses_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * aggregate(torch.max(losses, losses_clipped), mask, agg, max_len)
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


# ---- the forwards the loop calls: logprobs, values, sampling ---------------------------------------------------------
def autocast(device, dtype, weights_change=False):
    """Forward passes in `dtype` (bf16 on GPUs) with fp32 weights; a no-op in fp32. Autocast keeps each weight's
    bf16 copy until the region ends: right while the weights are fixed (the rollout's decoding steps cast them once),
    wrong across an optimizer step, after which the forwards would read the copies of before it. So a region whose
    weights change (the update) keeps no copies: each forward casts the weights it reads afresh."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=not weights_change)


def response_logprobs(model, query_responses, attention_mask, context_length, temperature, with_vocab=False):
    """Log π(token_t | earlier tokens) of every response token, from temperature-scaled logits (OAI, N+).
    Token t is predicted at position t-1, so the response's logits are logits[:, ctx-1:-1] (implementation
    details #5); only those T+1 positions are projected to the vocabulary (logits_to_keep). Log-softmax in fp32
    whatever the weights' dtype, then the sampled token gathered: one fused log_softmax is faster than gather minus
    logsumexp at the same peak memory (logsumexp's backward builds the full [B, T, V] softmax anyway; README,
    Performance). with_vocab: also the log-probabilities over the whole vocabulary, [B, T, V] (for the entropy)."""
    T = query_responses.shape[1] - context_length
    out = model(input_ids=model_inputs(query_responses, attention_mask), attention_mask=attention_mask,
                position_ids=position_ids_of(attention_mask), logits_to_keep=T + 1, use_cache=False)
    logp = torch.log_softmax(out.logits[:, :-1].float() / temperature, -1)                 # [B, T, V]
    tokens = model_inputs(query_responses, attention_mask)[:, context_length:]
    logprobs = logp.gather(-1, tokens[..., None]).squeeze(-1)
    return (logprobs, logp) if with_vocab else logprobs


def critic_values(critic, query_responses, attention_mask, context_length):
    """V_t, the value of the state *before* response token t: the same ctx-1:-1 slice as the logprobs (OAI, N+)."""
    return critic(query_responses, attention_mask, slice(context_length - 1, -1))


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
        # exponential per vocabulary entry: several times slower per token (README, Performance).
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


# ---- rollout: steps 1-6 of a PPO step -------------------------------------------------------------------------------
def generate(roles, prompts, c):
    """Steps 1-2: sample a reply to each left-padded prompt (with the log π_old of each token), truncate after the
    first stop token (EOS), and the response mask (True on real tokens, EOS included)."""
    queries, query_mask = left_pad([p.ids for p in prompts], PAD_ID, roles.device)
    sampled, logprobs = sample_responses(roles.actor, queries, query_mask, c["MAX_NEW_TOKENS"], c["TEMPERATURE"],
                                         roles.stop_ids, PAD_ID, roles.sync_stop)
    responses, mask = truncate_after_eos(sampled, roles.stop_ids, PAD_ID)
    return {"query_responses": torch.cat([queries, responses], 1),
            "attention_mask": torch.cat([query_mask, mask], 1), "context_length": queries.shape[1],
            "responses": responses, "mask": mask, "ended": ends_with_stop(responses, mask, roles.stop_ids),
            "logprobs": torch.where(mask, logprobs, INVALID_LOGPROB)}


def judge(roles, prompts, batch, c):
    """Steps 3-4 without the critic: the reference's logprobs of the replies, and the reward of prompt + reply
    (the reward model read at the last real token, or a reward function on the decoded text). Adds ref_logprobs,
    replies and raw_scores to batch."""
    qr, am, ctx, mask = batch["query_responses"], batch["attention_mask"], batch["context_length"], batch["mask"]
    ref_logprobs = frozen_forward(roles.ref, response_logprobs, qr, am, ctx, c["TEMPERATURE"],
                                  rows=c["MINI_BATCH_SIZE"])
    batch["ref_logprobs"] = torch.where(mask, ref_logprobs, INVALID_LOGPROB)
    batch["replies"] = [roles.tok.decode(r[m].tolist(), skip_special_tokens=True)
                        for r, m in zip(batch["responses"].cpu(), mask.cpu())]
    batch["raw_scores"] = roles.scorer(qr, am, ctx, prompts, batch["replies"], batch["ended"].tolist())
    return batch


def rollout(roles, prompts, beta, c, score_moments=None):
    """Steps 1-6 for this rank's share of a rollout batch. Returns a dict of [B, T] tensors (names as in N+/TRL)
    and per-reply info."""
    t0 = time.perf_counter()
    batch = generate(roles, prompts, c)  # 1 sample replies with their log π_old, 2 truncate after EOS + mask
    t_generate = time.perf_counter() - t0

    # 3 reference logprobs and critic values. The old logprobs (actor before this step's updates) are the
    # sampler's (N+, TRL-new), not a second forward of the actor (TRL-old, OpenRLHF): the same model, weights and
    # temperature, one token at a time through the KV cache; they equal the re-scored ones up to float rounding
    # (tested; under bf16 autocast inside the clip range). It saves one of the four forwards.
    # 4 reward-model score of prompt + reply, read at the last real token
    t0 = time.perf_counter()
    with torch.no_grad():
        values = None if roles.critic is None else critic_values(
            roles.critic, batch["query_responses"], batch["attention_mask"], batch["context_length"])
    batch = judge(roles, prompts, batch, c)
    scores = batch["raw_scores"] - c["MISSING_EOS_PENALTY"] * (~batch["ended"]).float()
    if c["OVERLONG_BUFFER"] and c["OVERLONG_PENALTY"]:  # DAPO: long replies cost, up to OVERLONG_PENALTY at the limit
        scores = scores + overlong_penalty(batch["mask"].sum(1), c["MAX_NEW_TOKENS"], c["OVERLONG_BUFFER"],
                                           c["OVERLONG_PENALTY"])
    if score_moments is not None:  # SCORE_NORM: running whitening of the score (PPO-max)
        score_moments.update(torch.tensor(all_gather_list(scores.tolist())))
        scores = (scores - score_moments.mean) / math.sqrt(score_moments.var + 1e-8)
    if c["SCORE_CLIP"] > 0:
        scores = scores.clamp(-c["SCORE_CLIP"], c["SCORE_CLIP"])

    # 5 per-token reward: -β·KL_t everywhere (KL_IN = "reward"; with "loss" β·KL is a term of the loss), + score at
    # the last real token
    mask = batch["mask"]
    reward_beta = beta if c["KL_IN"] == "reward" else 0.0
    rewards, kl, non_score_reward = compute_rewards(scores, batch["logprobs"], batch["ref_logprobs"], mask,
                                                    reward_beta, c["KL_ESTIMATOR"])
    # 6 advantages: GAE against the critic (returns before whitening; advantages whitened over the real tokens of the
    # whole batch, all ranks: N+, TRL), or a critic-free baseline (compute_advantages)
    advantages, returns = compute_advantages(rewards, values, mask, c["ADVANTAGE"], c["GAMMA"], c["LAM"],
                                             c["SAMPLES_PER_PROMPT"], c["GRPO_STD"])
    batch.update(prompts=list(prompts), values=values, scores=scores, rewards=rewards, kl=kl,
                 non_score_reward=non_score_reward,
                 advantages=advantages, returns=returns, beta=beta, time_generate=t_generate,
                 time_score=time.perf_counter() - t0)
    return batch


def dynamic_sampling(roles, prompts, more_prompts, beta, c, score_moments=None):
    """DAPO's dynamic sampling (Yu et al. 2025): a group whose replies all got the same score has advantage 0 and
    teaches nothing; it is dropped, and more prompts sampled (more_prompts()) for at most MAX_EXTRA_ROLLOUTS rounds,
    the same on every process. Still short, the batch is filled up with dropped groups (no policy gradient)."""
    n, need, t0 = c["SAMPLES_PER_PROMPT"], len(prompts) // c["SAMPLES_PER_PROMPT"], time.perf_counter()
    batches = [rollout(roles, prompts, beta, c, score_moments)]
    t_first = time.perf_counter() - t0
    for extra in range(c["MAX_EXTRA_ROLLOUTS"] + 1):
        batch = merge_rollouts(batches, {"responses": PAD_ID, "mask": False, "logprobs": INVALID_LOGPROB,
                                         "ref_logprobs": INVALID_LOGPROB}) if len(batches) > 1 else batches[0]
        scores = batch["scores"].reshape(-1, n)
        informative = ((scores.max(1).values - scores.min(1).values) > 1e-6).nonzero().flatten().tolist()
        short = max(0, need - len(informative))
        if extra == c["MAX_EXTRA_ROLLOUTS"] or all_reduce_sum(torch.tensor([float(short)],
                                                                          device=scores.device)).item() == 0:
            break
        batches.append(rollout(roles, more_prompts(), beta, c, score_moments))
    dropped = [g for g in range(len(scores)) if g not in informative]
    groups = sorted(informative[:need] + dropped[:short])
    rows = torch.tensor([g * n + k for g in groups for k in range(n)], device=batch["mask"].device)
    batch = {k: v.index_select(0, rows) if torch.is_tensor(v) else [v[i] for i in rows.tolist()]
             if isinstance(v, list) else v for k, v in batch.items()}
    return batch, {"train/groups_dropped": len(dropped) / len(scores), "train/extra_rollouts": float(extra),
                   "train/groups_short": float(short), "time/extra_sampling_s": time.perf_counter() - t0 - t_first}


# ---- PPO update: step 7 ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Trainer:
    """What trains: the modules the training forward calls (DDP/FSDP-wrapped), their parameters, AdamW, its schedule."""
    actor: torch.nn.Module
    critic: torch.nn.Module
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: object
    entropy_floor: float = 0.0  # nats per token: ENTROPY_FLOOR x step 1's entropy, set by the loop from step 2 on


def trim_padding(query_responses, attention_mask, context_length, mask):
    """A micro-batch without the columns that are padding in all its rows (they change nothing but the work).
    Returns (ids, attention_mask, context_length, T), T the response columns kept: slice [B, T] tensors [:, :T]."""
    first = int(attention_mask[:, :context_length].any(0).int().argmax())
    T = int(mask.any(0).sum())  # replies start at column 0 of the response and are contiguous
    end = context_length + T
    return query_responses[:, first:end], attention_mask[:, first:end], context_length - first, T


def ppo_update(trainer, batch, c, sizes=None, warmup=False):
    """Step 7: PPO_EPOCHS passes over freshly shuffled minibatches of the rollout; one optimizer step per minibatch
    of MINI_BATCH_SIZE·GRAD_ACCUM sequences (sizes.accum micro-batches on each rank under torchrun). Losses are token
    means per micro-batch, averaged over the micro-batches of a step (N+, TRL); DDP/FSDP average the gradients over
    ranks, once per optimizer step. train() mode only matters for gradient checkpointing, as every dropout is 0.
    Returns every micro-batch's stats ({name: float}; an optimizer step's numbers go with its last micro-batch)."""
    sizes = sizes or batch_sizes(c, world_size())
    B, ctx, mb, accum = len(batch["responses"]), batch["context_length"], sizes.micro, sizes.accum
    models = [m for m in (trainer.actor, trainer.critic) if m is not None]
    for m in models:
        m.train()
    stats, steps = [], []
    for _ in range(c["PPO_EPOCHS"]):
        order = torch.randperm(B)
        for start in range(0, B, mb * accum):
            for k in range(accum):
                idx = order[start + k * mb:start + (k + 1) * mb].to(batch["responses"].device)
                with gradient_sync(models, sync=k == accum - 1):
                    stats.append(micro_batch_backward(trainer.actor, trainer.critic, batch, idx, ctx, c, accum,
                                                      warmup, trainer.entropy_floor))
            steps.append(optimizer_step(trainer.optimizer, trainer.params, c["MAX_GRAD_NORM"], trainer.scheduler))
    for m in models:
        m.eval()
    # one device-to-host copy for all the statistics (an .item() each would wait for the GPU every time)
    names = list(stats[0])  # every micro-batch computes the same statistics
    stats = [dict(zip(names, row)) for row in torch.stack([torch.stack([s[k] for k in names]) for s in stats])
             .float().tolist()]
    for i, extra in enumerate(steps):  # the optimizer step's numbers go with its last micro-batch
        stats[(i + 1) * accum - 1].update(extra)
    return stats


def micro_batch_backward(actor, critic, batch, idx, ctx, c, accum, warmup=False, entropy_floor=0.0):
    """Forward and backward of one micro-batch (rows idx of the rollout): the clipped policy loss plus VF_COEF times
    the clipped value loss (no critic: none), plus β times the k3 KL to the reference when KL_IN = "loss" (GRPO's
    estimator, unbiased and never negative, its gradient through the current logprobs), minus ENTROPY_COEF times the
    entropy, each averaged by LOSS_AGG and divided by the micro-batches of the optimizer step. With ENTROPY_FLOOR the
    bonus is ENTROPY_COEF x how far the entropy's token mean is below entropy_floor (nats; 0 above it): it holds the
    entropy up, and never pushes it past the floor (cf. Skywork-OR1's adaptive entropy control, arXiv:2505.22312).
    On by default, where OAI, N+ and TRL have no bonus (implementation details #26): without it the demo's held-out
    replies lose half their variety across prompts (README, "The repeater across replies").
    warmup (critic warm-up): the value loss alone trains; the policy's numbers are only measured. Returns its
    statistics, {METRICS name: 0-d tensor}, only those it computes."""
    mb_ids, mb_attn, mb_ctx, T = trim_padding(batch["query_responses"][idx], batch["attention_mask"][idx], ctx,
                                              batch["mask"][idx])
    m = batch["mask"][idx, :T]
    if c["MASK_TRUNCATED"]:  # replies cut off at MAX_NEW_TOKENS take no part (TRL's mask_truncated_completions)
        m = m & batch["ended"][idx, None]
    agg = {"agg": c["LOSS_AGG"], "max_len": c["MAX_NEW_TOKENS"]}
    seq = c["RATIO_LEVEL"] == "sequence"  # GSPO clips a reply's ratio by its own, much smaller, range
    with torch.no_grad() if warmup else contextlib.nullcontext():
        new_logprobs, logp = response_logprobs(actor, mb_ids, mb_attn, mb_ctx, c["TEMPERATURE"], with_vocab=True)
        pg_loss, pg = policy_loss(new_logprobs, batch["logprobs"][idx, :T], batch["advantages"][idx, :T], m,
                                  c["SEQ_CLIP_RANGE"] if seq else c["CLIP_RANGE"],
                                  c["SEQ_CLIP_RANGE"] if seq else c["CLIP_RANGE_HIGH"], c["DUAL_CLIP"],
                                  c["RATIO_LEVEL"], **agg)
    with torch.no_grad():  # measured always; its graph ([B, T, V]) is built only where the bonus acts (one sync)
        h = masked_mean(entropy_from_logprobs(logp), m)
    loss = 0.0 if warmup else pg_loss
    stats = {"policy/approxkl_avg": pg["approxkl"], "policy/clipfrac_avg": pg["clipfrac"],
             "policy/entropy_avg": h, "loss/policy_avg": pg_loss.detach(), "val/ratio": pg["ratio"]}
    if c["CLIP_RANGE_HIGH"]:
        stats.update({"policy/clipfrac_low": pg["clipfrac_low"], "policy/clipfrac_high": pg["clipfrac_high"]})
    if c["ENTROPY_COEF"] and not warmup and (not c["ENTROPY_FLOOR"] or h < entropy_floor):
        entropy = entropy_from_logprobs(logp)
        loss = loss + c["ENTROPY_COEF"] * (entropy_floor - masked_mean(entropy, m) if c["ENTROPY_FLOOR"] else
                                           -aggregate(entropy, m, **agg))
    if c["KL_IN"] == "loss":
        # masked slots get the INVALID_LOGPROB both sides hold there (k3 = 0), so exp() never sees padding's logprobs
        kl_loss = aggregate(kl_per_token(torch.where(m, new_logprobs, INVALID_LOGPROB),
                                         batch["ref_logprobs"][idx, :T], "k3"), m, **agg)
        loss = loss + (0.0 if warmup else batch["beta"] * kl_loss)
        stats["loss/kl_avg"] = kl_loss.detach()
    # the actor's backward, then the critic's: the joint loss's gradients (no shared weights), half the activations
    if not warmup:  # in a critic warm-up step the actor's numbers are only measured
        (loss / accum).backward()
    if critic is not None:
        new_values = critic_values(critic, mb_ids, mb_attn, mb_ctx)
        vf_loss, stats["val/clipfrac_avg"] = value_loss(new_values, batch["values"][idx, :T],
                                                        batch["returns"][idx, :T], m, c["CLIP_RANGE_VALUE"], **agg)
        (c["VF_COEF"] * vf_loss / accum).backward()
        stats["loss/value_avg"] = vf_loss.detach()
    return stats


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
def ppo_step(roles, trainer, prompts, beta, c, sizes, score_moments=None, gold=None, warmup=False,
             more_prompts=None):
    """One whole PPO step: the rollout and its advantages (steps 1-6), the clipped updates (step 7), and the step's
    metrics row (step 8; β is adapted by the loop from row["objective/kl"]). warmup: a critic warm-up step, where
    only the critic trains; more_prompts: where DYNAMIC_SAMPLING takes more. Returns (row, rollout batch)."""
    memory = {}  # the peak memory of steps 1-6 and of step 7 (MiB; plumbing.peak_memory)
    with autocast(roles.device, roles.dtype), peak_memory(roles.device, memory, "mem/rollout_mb"):
        batch, sampling = dynamic_sampling(roles, prompts, more_prompts, beta, c, score_moments) \
            if c["DYNAMIC_SAMPLING"] else (rollout(roles, prompts, beta, c, score_moments), {})
    # step 7 on every rank, or on none: a batch with a non-finite score anywhere is not trained on
    t0 = time.perf_counter()
    lr = trainer.optimizer.param_groups[0]["lr"]  # the rate of this step's first optimizer step
    scores_ok = all_reduce_sum(torch.isfinite(batch["scores"]).all().logical_not().float()).item() == 0
    if scores_ok:
        with autocast(roles.device, roles.dtype, weights_change=True), peak_memory(roles.device, memory,
                                                                                  "mem/update_mb"):
            mb_stats = ppo_update(trainer, batch, c, sizes, warmup)
    else:  # the update's other columns are NaN in this row
        mb_stats = [{"policy/grad_norm": float("nan"), "train/skipped_frac": 1.0}]
    row = dict(step_metrics(batch, mb_stats, beta, gold, batch["prompts"], lr, time.perf_counter() - t0),
               **sampling, **memory, **{"train/bad_scores": float(not scores_ok)})
    if c["CRITIC_WARMUP_STEPS"]:
        row["train/critic_warmup"] = float(warmup)
    return row, batch


def step_metrics(batch, mb_stats, beta, gold, batch_prompts, lr, t_train):
    """The step's numbers (TRL's names where TRL has one; each declared in plumbing.METRICS), averaged over all
    micro-batches of the step and over ranks. The loop adds step, episodes, evaluation and timing columns."""
    mask, returns, values = batch["mask"], batch["returns"], batch["values"]
    resp_tokens = [r[m].tolist() for r, m in zip(batch["responses"].cpu(), mask.cpu())]
    row = {
        "objective/scores": batch["scores"].mean().item(),
        "objective/rlhf_reward": (batch["scores"] + batch["non_score_reward"].sum(1)).mean().item(),
        "objective/non_score_reward": batch["non_score_reward"].sum(1).mean().item(),
        "objective/kl": batch["kl"].sum(1).mean().item(),
        "objective/entropy": (-torch.where(mask, batch["logprobs"], 0.0).sum(1)).mean().item(),
        "objective/gold_scores": float(np.mean(gold([p.text for p in batch_prompts], batch["replies"])))
        if gold else float("nan"),
        **{k: float(np.mean([s[k] for s in mb_stats if k in s])) for k in mb_stats[-1]},
        "resp/length_mean": mask.sum(1).float().mean().item(),
        "resp/eos_frac": batch["ended"].float().mean().item(),
        "resp/repetition": float(np.mean([repetition_rate(t) for t in resp_tokens])),
        "time/generate_s": batch["time_generate"], "time/score_s": batch["time_score"], "time/train_s": t_train,
        "time/tokens_per_s": mask.sum().item() * world_size()
        / (batch["time_generate"] + batch["time_score"] + t_train),
    }
    if values is not None:  # how much of the returns' variance the critic's values explain (1 = all, 0 = the mean's)
        var_returns = torch.var(returns[mask], unbiased=False)
        row["val/explained_var"] = (1 - torch.var((returns - values)[mask], unbiased=False) / var_returns).item() \
            if var_returns > 0 else float("nan")
        row["val/mean_value"] = masked_mean(values, mask).item()
    return dict(all_mean(row), **{"objective/kl_coef": beta, "lr": lr})


# ---- the worked example: one reply of a PPO step with every number, token by token ---------------------------------
def worked_example(roles, batch, c, step):
    """One reply of this step's rollout with the numbers of steps 1-7 at each of its tokens (summary.json,
    worked_example.md): the one with the largest mean |advantage| over its tokens, where the step teaches most, so
    that anyone can recompute δ_t and the advantages from r_t and V_t. ratio: π_θ/π_old after the step's epochs (one
    more forward); clipped: the clip is active there now (no gradient from it). Every process runs it (FSDP)."""
    mask, adv = batch["mask"], batch["advantages"]
    i = int((torch.where(mask, adv.abs(), 0.0).sum(1) / mask.sum(1).clamp(min=1)).argmax())
    T, ctx = int(mask[i].sum()), batch["context_length"]
    with torch.no_grad(), autocast(roles.device, roles.dtype):
        new = response_logprobs(roles.actor, batch["query_responses"][i:i + 1], batch["attention_mask"][i:i + 1],
                                ctx, c["TEMPERATURE"])[0, :T].float()
    old, A = batch["logprobs"][i, :T], adv[i, :T]
    ratio = torch.exp(new - old)
    high = c["CLIP_RANGE"] if not c["CLIP_RANGE_HIGH"] else c["CLIP_RANGE_HIGH"]
    clipped = torch.where(A > 0, ratio > 1 + high, ratio < 1 - c["CLIP_RANGE"])
    rewards = batch["rewards"][i:i + 1, :T]
    ex = {"step": step, "prompt": batch["prompts"][i].conv, "reply": batch["replies"][i], "beta": batch["beta"],
          "gamma": c["GAMMA"], "lam": c["LAM"], "score": batch["scores"][i].item(), "advantage": c["ADVANTAGE"],
          "tokens": [roles.tok.decode([t]) for t in batch["responses"][i, :T].tolist()],
          "logprobs": old.tolist(), "ref_logprobs": batch["ref_logprobs"][i, :T].tolist(),
          "kl": batch["kl"][i, :T].tolist(), "rewards": rewards[0].tolist(), "advantages": A.tolist(),
          "ratio": ratio.tolist(), "clipped": clipped.tolist(), "logprob_before": old.sum().item(),
          "logprob_after": new.sum().item()}
    one = torch.ones(1, T, dtype=torch.bool, device=mask.device)
    if batch["values"] is not None:
        values = batch["values"][i:i + 1, :T]
        raw, _ = compute_gae(rewards, values, one, c["GAMMA"], c["LAM"])
        next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1)  # V = 0 after the last token
        ex.update(values=values[0].tolist(), deltas=(rewards + c["GAMMA"] * next_values - values)[0].tolist(),
                  advantages_raw=raw[0].tolist(), returns=batch["returns"][i, :T].tolist())
    elif c["ADVANTAGE"] == "reinforce++":
        ex["advantages_raw"] = compute_gae(rewards, torch.zeros_like(rewards), one, c["GAMMA"], 1.0)[0][0].tolist()
    else:  # grpo, rloo: the reply's total reward against the others in its group; the same advantage on each token
        ex.update(advantages_raw=A.tolist(), group=group_rows(batch, i, c["SAMPLES_PER_PROMPT"], c["ADVANTAGE"]))
    return ex


# ---- evaluation -----------------------------------------------------------------------------------------------------
def evaluate(roles, prompts, c, gold, step):
    """Held-out evaluation at a fixed seed (SEED + 1; the RNG state is restored afterwards, so it does not change
    the run): steps 1-4 of the rollout, a rollout batch of prompts at a time, then the mean RM score, KL to the
    reference (nats per reply), gold score, reply length, EOS rate and diversity; under torchrun each rank takes an
    equal share, gathered in order. Returns (results with the step, per-prompt detail with its seconds and peak MiB)."""
    t0, n = time.perf_counter(), c["MINI_BATCH_SIZE"] * c["GRAD_ACCUM"] * c["PPO_BUFFER_SIZE"]  # a rollout batch
    rank, world = (torch.distributed.get_rank(), world_size()) if dist_on() else (0, 1)
    mine = prompts[rank * (len(prompts) // world):(rank + 1) * (len(prompts) // world)]
    out, memory = {"rm": [], "kl": [], "len": [], "eos": [], "replies": [], "tokens": []}, {}
    with torch.random.fork_rng(devices=[roles.device] if roles.device.type == "cuda" else []), \
            autocast(roles.device, roles.dtype), peak_memory(roles.device, memory, "peak_mb"):
        torch.manual_seed(c["SEED"] + 1 + rank)
        for i in range(0, len(mine), n):
            batch = judge(roles, mine[i:i + n], generate(roles, mine[i:i + n], c), c)
            out["rm"] += batch["raw_scores"].tolist()
            out["kl"] += torch.where(batch["mask"], kl_per_token(batch["logprobs"], batch["ref_logprobs"]),
                                     0.0).sum(1).tolist()
            out["len"] += batch["mask"].sum(1).tolist()
            out["eos"] += batch["ended"].float().tolist()
            out["replies"] += batch["replies"]
            out["tokens"] += [r[m].tolist() for r, m in zip(batch["responses"].cpu(), batch["mask"].cpu())]
    out["gold"] = gold([p.text for p in mine], out["replies"]) if gold else [None] * len(mine)
    out = {k: all_gather_list(v) for k, v in out.items()}
    res = {"rm_score": float(np.mean(out["rm"])), "kl": float(np.mean(out["kl"])),
           "resp_length": float(np.mean(out["len"])), "eos_frac": float(np.mean(out["eos"])),
           **diversity(out.pop("tokens"))}
    if gold:
        res["gold_score"] = float(np.mean(out["gold"]))
    out.update(prompts=[p.conv for p in prompts], seconds=time.perf_counter() - t0, **memory)
    return dict(res, step=step), out


# ---- the loop -------------------------------------------------------------------------------------------------------
def train(c):
    """The whole run for the resolved config `c` ({NAME: value}); returns the summary dict (rank 0) or None."""
    env = setup(c)  # config checks, processes and their seeds, device and dtype (plumbing.py)
    sizes = batch_sizes(c, env.world)  # derived once, checked
    roles = load_roles(c, env.device, env.dtype, sync_stop=env.fsdp)  # the four roles (loading.py)
    # what trains: actor and critic (DDP- or FSDP2-wrapped under torchrun) and one AdamW over both, as N+ and TRL-new
    # (PolicyAndValueWrapper): one step, one gradient clip; fused: one kernel for all parameters, not a loop
    actor, critic = wrap_for_training(roles.actor, roles.critic, c, env.device)
    params = trainable_parameters([m for m in (actor, critic) if m is not None])
    groups = [{"params": trainable_parameters([actor])},  # CRITIC_LEARNING_RATE: one parameter group per model
              {"params": trainable_parameters([critic]), "lr": c["CRITIC_LEARNING_RATE"]}] \
        if c["CRITIC_LEARNING_RATE"] else params
    optimizer = torch.optim.AdamW(groups, lr=c["LEARNING_RATE"], eps=c["ADAM_EPS"], weight_decay=c["WEIGHT_DECAY"],
                                  fused=env.device.type in ("cpu", "cuda") and not env.fsdp)
    trainer = Trainer(actor, critic, params, optimizer, lr_schedule(optimizer, c))
    kl_ctl = AdaptiveKLController(c["INIT_KL_COEF"], c["PPO_TARGET"], c["KL_HORIZON"], c["ADAPTIVE_KL"])
    score_moments = RunningMoments() if c["SCORE_NORM"] else None
    gold = load_score_fn(c["GOLD_REWARD"], "GOLD_REWARD", c["SCORE_TIMEOUT"]) if c["GOLD_REWARD"] else None
    prompts, eval_prompts = load_prompt_files(c, DEFAULTS, roles, sizes, env.log)
    # resume from the newest checkpoint of this config, or start fresh (plumbing.py); nothing written yet
    run = Run(c, DEFAULTS, env, sizes, roles, trainer, kl_ctl, score_moments, prompts, eval_prompts)
    if eval_prompts and run.state.step == 0:  # evaluation before training, before anything is written
        run.add_eval(*evaluate(roles, eval_prompts, c, gold, 0))
    if run.state.step >= c["TOTAL_STEPS"]:  # resumed a finished run: nothing to do, nothing written
        return None
    with hold_output_dir(c, env, run.dashboards):  # OUTPUT_DIR for this run alone, and TensorBoard / W&B
        with run:  # writes into OUTPUT_DIR; every way out closes the CSV and restores the signal handlers
            for step, batch_prompts in run.steps():  # this rank's share of each rollout batch, reshuffled each pass
                warmup = step <= c["CRITIC_WARMUP_STEPS"]  # the first steps train the critic alone
                trainer.entropy_floor = entropy_floor(run.state.rows, c)  # ENTROPY_FLOOR x step 1's entropy
                row, batch = ppo_step(roles, trainer, batch_prompts, kl_ctl.value, c, sizes, score_moments, gold,
                                      warmup, run.more_prompts)
                if math.isfinite(row["objective/kl"]) and not warmup:  # step 8: β from the batch's mean KL per
                    kl_ctl.update(row["objective/kl"], sizes.rollout)  # reply, all ranks (OAI)
                if eval_prompts and c["EVAL_EVERY"] and step % c["EVAL_EVERY"] == 0 and step < c["TOTAL_STEPS"]:
                    row.update(run.add_eval(*evaluate(roles, eval_prompts, c, gold, step)))
                if step == 1 or step == c["TOTAL_STEPS"]:  # one reply with every number: worked_example.md
                    run.keep_example(worked_example(roles, batch, c, step))
                run.record(step, row, batch)  # the CSV row and samples; stops after MAX_BAD_STEPS
                if run.checkpoint_or_stop(step):  # a checkpoint when due; True after Ctrl-C / SIGTERM
                    break
        eval_after = None
        if run.finished():  # evaluation after training, then the trained models
            eval_after = evaluate(roles, eval_prompts, c, gold, c["TOTAL_STEPS"]) if eval_prompts else None
            if eval_after:
                run.add_eval(*eval_after)
            if c["SAVE_MODEL"]:
                run.memory["saving"] = save_models(roles, run.model_dir, env)
        return run.finish(eval_after)  # summary.json, the curves, health verdicts


if __name__ == "__main__":
    leave(main(train, sys.argv[1:], DEFAULTS, __doc__, __file__))
