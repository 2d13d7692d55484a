"""What runs around the PPO loop of code/ppo.py (the lesson), none of it changing what PPO computes.

    processes and batches   setup, Setup, batch_sizes, check_config: every setting's bounds, checked once
    the run's bookkeeping   Run, RunState: resume, the CSV, records, checkpoints, interrupts, the end of the run
    checkpoints             save_checkpoint, choose_checkpoint: exact resume, atomic writes
    reporting               METRICS (every logged metric, named once), curves, summary.json, health verdicts,
                            TensorBoard / W&B dashboards
    command line            resolve_config (--name=value, --help), main (exit codes), leave
    distributed             torchrun detection, all-reduce helpers, DDP / FSDP2 wrapping

Settings reach this module as arguments (the config dict `c` and the defaults of code/ppo.py); it never imports ppo.
"""
import collections
import contextlib
import csv
import dataclasses
import difflib
import errno
import importlib.util
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

import matplotlib
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from loading import AdaptersOff, ConfigError, first_line

matplotlib.use("Agg")  # write PNGs without a display
import matplotlib.pyplot as plt  # noqa: E402


class TrainingDiverged(Exception):
    """MAX_BAD_STEPS steps in a row with non-finite numbers: reported as one line, exit code 3."""


# settings that may change when a run is resumed: how long it runs and how it reports, not what it computes
RESUMABLE_CHANGES = {"TOTAL_STEPS", "RESUME", "SAVE_EVERY", "KEEP_CHECKPOINTS", "EVAL_EVERY", "EVAL_FILE", "EVAL_SIZE",
                     "SAMPLE_EVERY", "OUTPUT_DIR", "SAVE_MODEL", "MAX_BAD_STEPS", "DEVICE", "REPORT_TO",
                     "SCORE_TIMEOUT", "THREADS"}


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


DIST_DEVICE = torch.device("cpu")  # where collectives run: the rank's GPU under NCCL (set by setup_distributed)


def setup_distributed(c):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK (nanoGPT-style detection); a plain `python` run is one process.
    Returns (rank, world, device)."""
    global DIST_DEVICE
    if "RANK" not in os.environ:
        return 0, 1, pick_device(c["DEVICE"])
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


def busy_cores(window=0.2):
    """How many cores other programs keep busy, from the idle time in /proc/stat over `window` seconds (this process
    sleeps meanwhile, so all of the busy time is theirs). None where there is no /proc/stat (macOS, Windows)."""
    def idle_and_total():
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return ticks[3] + ticks[4], sum(ticks[:8])  # idle + iowait; user .. steal
    try:
        idle0, total0 = idle_and_total()
        time.sleep(window)
        idle1, total1 = idle_and_total()
    except (OSError, ValueError, IndexError):
        return None
    cpus = os.cpu_count() or 1
    return cpus * (1 - (idle1 - idle0) / max(1, total1 - total0))


_torch_threads = torch.get_num_threads()  # torch's own default (the physical cores), before any run changes it


def choose_threads(setting, local_processes=1):
    """torch's CPU threads: THREADS, else OMP_NUM_THREADS when set, else ("auto") torch's default (the physical
    cores, shared among this machine's torchrun processes) less the cores other programs keep busy now, at least 1.
    Why: with one thread per core already taken, a step of many small ops waits at every OpenMP barrier for a thread
    that another process holds (README, Performance: with one of 2 cores busy, a demo step took 4.1x a quiet one at
    2 threads and 1.2x at 1; SmolLM2's 3.3x and 1.5x). Returns (threads, why) and sets them."""
    if setting != "auto":
        n, why = int(setting), f"THREADS = {setting}"
    elif os.environ.get("OMP_NUM_THREADS"):
        n, why = _torch_threads, f"OMP_NUM_THREADS = {os.environ['OMP_NUM_THREADS']}"
    else:
        share = max(1, _torch_threads // local_processes)
        busy = busy_cores()
        free = share if busy is None else min(share, round((os.cpu_count() or 1) - busy))
        n = max(1, free)
        why = (f"THREADS = auto: {share} core(s) for this process" +
               ("" if busy is None else f", {busy:.1f} busy with other programs at start"))
    torch.set_num_threads(n)
    return n, why


def keep_freed_memory(device, params=()):
    """On a CPU under glibc (Linux): the blocks a micro-batch frees stay with the process for the next one, rather
    than going back to the kernel, which zero-fills fresh pages at their first touch (on a 2-core VM a fifth to
    nearly half of the CPU time was the kernel's; README, "Speed on a real model"). glibc's defaults hand the heap's
    free top back once it passes twice the largest block freed yet (at most 64 MiB), and give every block from 32 MiB
    up pages of its own, returned at free. Here the top is kept up to 2 GiB (M_TRIM_THRESHOLD), and so are blocks up
    to the largest trained tensor (M_MMAP_THRESHOLD, at least 32 MiB, at most 1 GiB): its gradient is made afresh
    every micro-batch (SmolLM2's embedding: 108 MiB, and the 49k-wide logits beside it). Under LoRA that is 32 MiB:
    keeping every block made LoRA's peak 1.65x. SmolLM2, bf16, 2 cores: full fine-tuning's step 0.74-0.94x of 32 MiB's,
    itself 0.90-0.98x of glibc's defaults. Left alone where the environment tunes glibc's allocator (MALLOC_*,
    GLIBC_TUNABLES). Returns what it did."""
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return "the allocator's defaults"
    if any(k.startswith("MALLOC_") for k in os.environ) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "glibc's settings from the environment"
    import ctypes
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl)
        return "the C library's defaults (not glibc)"
    largest = max((p.numel() * p.element_size() for p in params), default=0)
    # whole MiB above the largest tensor, so that its gradient stays in the heap; at least glibc's own 32 MiB, and at
    # most 1 GiB, half the 2 GiB top kept below: a larger block freed at the top would be handed back anyway
    mib = min(max(32, -(-largest // 2**20) + 1), 1024)
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    if mallopt(M_MMAP_THRESHOLD, mib << 20) != 1 or mallopt(M_TRIM_THRESHOLD, (2 << 30) - 1) != 1:
        return "glibc's defaults (mallopt refused)"
    return f"glibc keeps freed blocks under {mib} MiB for reuse (up to 2 GiB)"


def reset_peak_memory(device):
    """Start measuring a phase's peak memory (peak_memory_mb): torch's allocated peak on CUDA, the resident set's
    high-water mark elsewhere (Linux: VmHWM, which writing 5 to /proc/self/clear_refs resets)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux: peak_memory_mb is NaN there


def peak_memory_mb(device):
    """The peak since reset_peak_memory, in MiB: GPU memory that torch allocated on CUDA, else the process's
    resident set (CPU: weights, activations, optimizer state, allocator caches); NaN where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return float("nan")


@contextlib.contextmanager
def peak_memory(device, into, key):
    """into[key] = the peak memory (MiB) of the block."""
    reset_peak_memory(device)
    yield
    into[key] = peak_memory_mb(device)


def pick_dtype(name, device):
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def cpu_multiplies_bf16():
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX), where torch's bf16 products run at ~2.3x
    its fp32 ones (README, "bf16 on a CPU"); without them bf16 is emulated, and slower than fp32."""
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(p() for p in probes if p is not None)


def check_writable(output_dir, metrics_dir, rank):
    try:
        os.makedirs(metrics_dir, exist_ok=True)
        probe = os.path.join(metrics_dir, f".write_test{rank}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"OUTPUT_DIR {output_dir!r} is not writable ({e.strerror}); pick another with "
                          f"--output_dir=...") from None


# ---- config checks and the LR schedule ------------------------------------------------------------------------------
def lr_schedule(optimizer, c):
    """LR_SCHEDULE through transformers' get_scheduler, stepped once per optimizer step: WARMUP_STEPS steps of linear
    warm-up from 0, then constant, or a linear or cosine decay to 0 at the run's last optimizer step (TOTAL_STEPS x
    PPO_EPOCHS x PPO_BUFFER_SIZE of them: each epoch makes PPO_BUFFER_SIZE optimizer steps)."""
    from transformers import get_scheduler
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[c["LR_SCHEDULE"]]
    return get_scheduler(name, optimizer, num_warmup_steps=c["WARMUP_STEPS"],
                         num_training_steps=c["TOTAL_STEPS"] * c["PPO_EPOCHS"] * c["PPO_BUFFER_SIZE"])


# Every setting's domain, checked in one place (check_config): name -> (test, what it must be). A float must also be
# finite (NaN passes every comparison as False, and inf passes "> 0").
POSITIVE_INTS = ("MINI_BATCH_SIZE", "GRAD_ACCUM", "PPO_BUFFER_SIZE", "PPO_EPOCHS", "MAX_NEW_TOKENS",
                 "MAX_PROMPT_TOKENS", "KEEP_CHECKPOINTS", "MAX_BAD_STEPS", "SAMPLES_PER_PROMPT")
NON_NEGATIVE = ("TOTAL_STEPS", "EVAL_EVERY", "SAMPLE_EVERY", "EVAL_SIZE", "SAVE_EVERY", "WARMUP_STEPS", "LORA_R",
                "INIT_KL_COEF", "CLIP_RANGE", "CLIP_RANGE_VALUE", "VF_COEF", "MAX_GRAD_NORM", "SCORE_CLIP",
                "MISSING_EOS_PENALTY", "WEIGHT_DECAY", "SCORE_TIMEOUT", "ENTROPY_COEF", "ENTROPY_FLOOR",
                "CRITIC_WARMUP_STEPS", "CRITIC_LEARNING_RATE", "OVERLONG_BUFFER", "OVERLONG_PENALTY", "CLIP_RANGE_HIGH",
                "DUAL_CLIP", "MAX_EXTRA_ROLLOUTS")
POSITIVE = ("PPO_TARGET", "TEMPERATURE", "KL_HORIZON", "LEARNING_RATE", "ADAM_EPS", "LORA_ALPHA", "SEQ_CLIP_RANGE")
UNIT_INTERVAL = ("GAMMA", "LAM")
CHOICES = {"ADVANTAGE": ("gae", "grpo", "rloo", "reinforce++"), "KL_IN": ("reward", "loss"),
           "KL_ESTIMATOR": ("k1", "k3"), "LR_SCHEDULE": ("constant", "linear", "cosine"),
           "DTYPE": ("auto", "float32", "bfloat16", "float16"), "DISTRIBUTED": ("ddp", "fsdp"),
           "LOSS_AGG": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"),
           "RATIO_LEVEL": ("token", "sequence")}


def check_config(c):
    """The domain of every setting, one message each (batch sizes are derived and checked in ppo.batch_sizes)."""
    for k, v in c.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{k} = {v} must be a finite number")
    for k in POSITIVE_INTS:
        if c[k] < 1:
            raise ConfigError(f"{k} = {c[k]} must be a positive integer")
    for k in NON_NEGATIVE:
        if c[k] < 0:
            raise ConfigError(f"{k} = {c[k]} must be >= 0" + (" (0 = off)" if k == "LORA_R" else ""))
    for k in POSITIVE:
        if not c[k] > 0:
            raise ConfigError(f"{k} = {c[k]} must be > 0")
    for k in UNIT_INTERVAL:
        if not 0 <= c[k] <= 1:
            raise ConfigError(f"{k} = {c[k]} must lie in [0, 1]")
    for k, allowed in CHOICES.items():
        if c[k] not in allowed:
            raise ConfigError(f"{k} = {c[k]!r} must be one of {', '.join(allowed)}")
    if c["THREADS"] != "auto" and not (str(c["THREADS"]).isdigit() and int(c["THREADS"]) > 0):
        raise ConfigError(f"THREADS = {c['THREADS']!r} must be 'auto' or a positive number of CPU threads")
    if not 0 <= c["SEED"] < 2 ** 32:
        raise ConfigError(f"SEED = {c['SEED']} must lie in [0, 2**32 - 1] (numpy's seed range)")
    if c["ADVANTAGE"] in ("grpo", "rloo") and c["SAMPLES_PER_PROMPT"] < 2:
        raise ConfigError(f"SAMPLES_PER_PROMPT = {c['SAMPLES_PER_PROMPT']} is too few for ADVANTAGE = "
                          f"{c['ADVANTAGE']!r}: its baseline is the other replies to the same prompt; use 2 or more "
                          f"(4-16 is usual)")
    check_beyond_the_seed(c)
    optimizer_steps = c["TOTAL_STEPS"] * c["PPO_EPOCHS"] * c["PPO_BUFFER_SIZE"]
    if c["WARMUP_STEPS"] > optimizer_steps:
        raise ConfigError(f"WARMUP_STEPS = {c['WARMUP_STEPS']} is more than the run's {optimizer_steps} optimizer "
                          f"steps (TOTAL_STEPS x PPO_EPOCHS x PPO_BUFFER_SIZE): the learning rate would never reach "
                          f"LEARNING_RATE; lower --warmup_steps")


def check_beyond_the_seed(c):
    """The settings beyond the seed's PPO that only make sense together with others."""
    if c["CLIP_RANGE_HIGH"] and c["CLIP_RANGE_HIGH"] < c["CLIP_RANGE"]:
        raise ConfigError(f"CLIP_RANGE_HIGH = {c['CLIP_RANGE_HIGH']} is below CLIP_RANGE = {c['CLIP_RANGE']}: "
                          f"clip-higher widens the upper bound (DAPO: 0.28 over 0.2); 0 keeps CLIP_RANGE")
    if c["DUAL_CLIP"] and c["DUAL_CLIP"] <= 1:
        raise ConfigError(f"DUAL_CLIP = {c['DUAL_CLIP']} must be > 1 (3 is usual) or 0 (off): it caps the loss of a "
                          f"negative advantage at DUAL_CLIP x |A|")
    if c["OVERLONG_BUFFER"] > c["MAX_NEW_TOKENS"]:
        raise ConfigError(f"OVERLONG_BUFFER = {c['OVERLONG_BUFFER']} is longer than MAX_NEW_TOKENS = "
                          f"{c['MAX_NEW_TOKENS']}; the penalty zone is the last OVERLONG_BUFFER tokens of a reply")
    if c["DYNAMIC_SAMPLING"] and c["ADVANTAGE"] not in ("grpo", "rloo"):
        raise ConfigError("DYNAMIC_SAMPLING drops groups of replies that all scored the same; it needs a group "
                          "baseline: --advantage=grpo or rloo with --samples_per_prompt=4 or more")
    for k in ("CRITIC_WARMUP_STEPS", "CRITIC_LEARNING_RATE"):
        if c[k] and c["ADVANTAGE"] != "gae":
            raise ConfigError(f"{k} = {c[k]} needs a critic, but ADVANTAGE = {c['ADVANTAGE']!r} trains none; use "
                              f"--advantage=gae or --{k.lower()}=0")


# ---- run setup and resume -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Setup:
    """Where and how the run computes, decided before any model loads (setup())."""
    rank: int
    world: int     # processes
    device: torch.device
    dtype: torch.dtype
    fsdp: bool     # under torchrun with DISTRIBUTED = "fsdp": actor and critic are sharded over the processes
    master: bool   # rank 0: only it prints, shows the bar and writes files
    log: object    # print on rank 0, nothing on the others
    threads: str   # torch's CPU threads and why (choose_threads)


def setup(c):
    """Check the config, start the processes (torchrun) and seed them, check that OUTPUT_DIR is writable. Nothing is
    written yet: a bad input leaves earlier outputs intact."""
    check_config(c)
    rank, world, device = setup_distributed(c)
    check_writable(c["OUTPUT_DIR"], os.path.join(c["OUTPUT_DIR"], "ppo_metrics"), rank)
    random.seed(c["SEED"]), np.random.seed(c["SEED"]), torch.manual_seed(c["SEED"])
    threads, why = choose_threads(c["THREADS"], int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return Setup(rank, world, device, pick_dtype(c["DTYPE"], device), dist_on() and c["DISTRIBUTED"] == "fsdp",
                 rank == 0, print if rank == 0 else (lambda *a, **k: None), f"{threads} ({why})")


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
    worked_example: dict = dataclasses.field(default_factory=dict)  # {"first", "last"}: ppo.worked_example


class Run:
    """A run's bookkeeping around the loop in ppo.train(), complete when made: its state, resumed from the newest
    checkpoint of the same config or fresh; then writing (`with run:` opens the CSV and installs the Ctrl-C / SIGTERM
    handler, and leaving it closes and restores both), each step's record, checkpoints, the end of the run."""

    def __init__(self, c, defaults, env, sizes, roles, trainer, kl_ctl, score_moments, prompts, eval_prompts):
        self.c, self.defaults, self.env, self.sizes, self.log, self.roles = c, defaults, env, sizes, env.log, roles
        self.trainer, self.kl_ctl, self.score_moments, self.prompts = trainer, kl_ctl, score_moments, prompts
        self.metrics_dir, self.model_dir, self.ckpt_dir = (os.path.join(c["OUTPUT_DIR"], d) for d in
                                                           ("ppo_metrics", "ppo_model", "checkpoints"))
        cpu_memory = keep_freed_memory(env.device, trainer.params)  # sized by what trains: from here on
        self.about = describe(c, env, sizes, roles, trainer.params, prompts, eval_prompts, self.metrics_dir,
                              self.model_dir, self.ckpt_dir, cpu_memory)
        self.dashboards = Dashboards(c["REPORT_TO"])  # checks the packages now; opened when writing starts
        self.state = RunState(config={k: c[k] for k in defaults}, kl_coef=kl_ctl.value)
        self.t_session, self.memory = time.perf_counter(), {"loading": peak_memory_mb(env.device)}  # MiB by phase
        self.prompt_rng = torch.Generator().manual_seed(c["SEED"])  # the same prompt order on every rank
        self.resume_path, self.move_aside = choose_checkpoint(c, defaults, self.ckpt_dir, self.log)
        if self.resume_path:
            self.state = resume(self.resume_path, roles, trainer, kl_ctl, score_moments, env, self.prompt_rng, c,
                                self.state.config)
        else:
            torch.manual_seed(c["SEED"] + env.rank)  # each rank samples its own replies

    def add_eval(self, res, detail):
        """Keep a held-out evaluation (before training, during it, or after); returns its CSV columns."""
        self.state.timing["eval"] += detail["seconds"]
        self.memory["evaluation"] = max(self.memory.get("evaluation", detail["peak_mb"]), detail["peak_mb"])
        self.state.eval_points.append(res)
        if self.state.step == 0 and not self.resume_path:
            self.state.eval_before, self.state.detail_before = res, detail
            self.log("eval before:", json.dumps({k: round(v, 3) for k, v in res.items()}) + unended(res, self.c))
        elif self.finished():
            self.log("eval after: ", json.dumps({k: round(v, 3) for k, v in res.items()}))
            if self.env.master:
                self.dashboards.log(eval_columns(res), self.c["TOTAL_STEPS"])
        return eval_columns(res)

    # -- writing: from here on the run writes into OUTPUT_DIR --
    def __enter__(self):
        self.csv = open_csv(self.c, self.state, self.about, self.dashboards, self.resume_path, self.move_aside,
                            self.ckpt_dir, self.env.master, self.log)
        self.stop = StopFlag(self.log)
        self.last_saved, self.first_step = (self.state.step if self.resume_path else -1), self.state.step + 1
        self.bar = tqdm(range(self.state.step + 1, self.c["TOTAL_STEPS"] + 1), desc="PPO", dynamic_ncols=True,
                        disable=not self.env.master, initial=self.state.step, total=self.c["TOTAL_STEPS"])
        return self

    def __exit__(self, *exc):
        self.bar.close()
        self.stop.restore()
        if self.csv:
            self.csv.close()

    def steps(self):
        """The steps still to run, each with this rank's share of its rollout batch (next_prompts)."""
        for step in self.bar:
            self.t_step = time.perf_counter()
            yield step, self.more_prompts()

    def more_prompts(self):  # this rank's share of the next rollout batch
        return next_prompts(self.state, self.prompts, self.sizes, self.env.rank, self.prompt_rng)

    def record(self, step, row, batch):
        """Complete the step's row (METRICS order), write the CSV row and samples, update the bar; stop with
        TrainingDiverged after MAX_BAD_STEPS steps in a row with non-finite numbers."""
        c, state = self.c, self.state
        row.update({"step": step, "episodes": step * self.sizes.rollout})
        if dist_on():  # every rank must hold the same β and (DDP) the same weights; FSDP shards differ by design
            row["dist/ranks_in_sync"] = ranks_in_sync(self.kl_ctl.value, self.roles, self.env.fsdp)
        for k in ("generate", "score", "train"):
            state.timing[k] += row[f"time/{k}_s"]
        row["time/step_s"] = time.perf_counter() - self.t_step  # the whole step: phases, metrics, gold, evaluation
        row = metrics_row(row, self.about["columns"])
        state.rows.append(row)
        state.step = step
        state.bad_streak = state.bad_streak + 1 if row["train/bad_scores"] > 0 or row["train/skipped_frac"] > 0 else 0
        if self.env.master:
            for note in step_notes(row, step == self.first_step, c):
                self.bar.write(note)
            self.csv.write([row])
            self.dashboards.log(row, step)
            if c["SAMPLE_EVERY"] and (step == 1 or step % c["SAMPLE_EVERY"] == 0):
                write_samples(self.about["files"]["samples"], step, batch["prompts"], batch, self.dashboards)
            self.bar.set_postfix(score=f"{row['objective/scores']:.2f}", kl=f"{row['objective/kl']:.2f}",
                                 beta=f"{row['objective/kl_coef']:.3f}",
                                 **({"gold": f"{row['objective/gold_scores']:.2f}"} if c["GOLD_REWARD"] else {}))
        if state.bad_streak >= c["MAX_BAD_STEPS"]:
            raise diverged(state.bad_streak, step, self.ckpt_dir)

    def keep_example(self, example):  # the first or the last step's worked example: summary.json, worked_example.md
        self.state.worked_example["first" if example["step"] == 1 else "last"] = example
        if self.env.master:
            write_worked_example(os.path.join(self.metrics_dir, "worked_example.md"), self.state.worked_example)

    def checkpoint_or_stop(self, step):
        """Checkpoint every SAVE_EVERY steps, at the end, and when asked to stop (never right after a bad step);
        returns True when Ctrl-C / SIGTERM asked to stop (on any rank)."""
        c = self.c
        interrupted = self.stop.any_rank()
        due = interrupted or step == c["TOTAL_STEPS"] or (c["SAVE_EVERY"] and step % c["SAVE_EVERY"] == 0)
        if due and self.state.bad_streak == 0:
            self.tick()
            self.state.kl_coef = self.kl_ctl.value
            self.state.score_moments = dict(self.score_moments.__dict__) if self.score_moments is not None else None
            path = save_checkpoint(self.ckpt_dir, c["KEEP_CHECKPOINTS"], self.state, self.roles, self.trainer,
                                   self.prompt_rng, self.env)
            if self.env.master and self.last_saved < 0:  # the first one this session: what they cost on disk
                self.log(checkpoint_size(path, c["KEEP_CHECKPOINTS"], self.ckpt_dir))
            self.last_saved = step
            if self.env.master and not interrupted and step < c["TOTAL_STEPS"]:
                write_reports(self.summary("running"), self.state, self.metrics_dir, c)
        return interrupted

    def finished(self):  # the loop ran to TOTAL_STEPS (not stopped by Ctrl-C / SIGTERM)
        return not self.stop.signum and self.state.step >= self.c["TOTAL_STEPS"]

    def tick(self):  # the run's wall time, this session's added
        now = time.perf_counter()
        self.state.wall_s, self.t_session = self.state.wall_s + now - self.t_session, now

    def summary(self, status, eval_after=None, detail_after=None):
        return build_summary(status, self.state, self.c, self.defaults, self.about, self.roles.notes, eval_after,
                             detail_after, self.memory)

    def finish(self, eval_after=None):
        """After the loop: an interrupted run writes its summary and the command that resumes it; a finished one
        (evaluated after training, models saved) writes summary.json and the curves. eval_after: (res, detail)."""
        c, state = self.c, self.state
        if not self.finished():
            saved = "saved" if self.last_saved == state.step else "not saved"
            self.log(f"interrupted after step {state.step}; checkpoint {saved}; continue with: "
                     f"{resume_command(c, self.defaults)}")
            if self.env.master:
                self.tick()
                summary = self.summary("interrupted")
                summary["interrupted_by"] = signal.Signals(self.stop.signum).name if self.stop.signum else None
                write_reports(summary, state, self.metrics_dir, c)
            return {"status": "interrupted", "signum": self.stop.signum}
        if dist_on():
            torch.distributed.barrier()
        if not self.env.master:
            return None
        self.tick()
        summary = self.summary("finished", *(eval_after or (None, None)))
        write_reports(summary, state, self.metrics_dir, c)
        self.log("health:\n  " + "\n  ".join(summary["health"]))
        self.log(f"done in {summary['wall_time_s']:.0f}s; read {self.metrics_dir}/summary.json, then "
                 f"training_curves.png, then training_metrics.csv")
        return summary


def step_notes(row, first, c):
    """What a step's row tells the user at once: where the time of the session's first step went, the entropy floor
    (set by step 1), and groups of a dynamic-sampling batch that teach nothing."""
    notes = [step_time_note(row, c)] if first else []
    h = row.get("policy/entropy_avg", math.nan)
    if row["step"] == 1 and c["ENTROPY_COEF"] and c["ENTROPY_FLOOR"] and math.isfinite(h):
        notes.append(f"note: from step 2 the entropy bonus (ENTROPY_COEF = {c['ENTROPY_COEF']:g}) holds the entropy at "
                     f">= {c['ENTROPY_FLOOR'] * h:.3f} nats/token (ENTROPY_FLOOR = {c['ENTROPY_FLOOR']:g} x step 1's "
                     f"{h:.3f}), and acts only below it")
    if row.get("train/groups_short", 0) > 0:
        notes.append(f"note: step {int(row['step'])}: {row['train/groups_short']:.0f} groups of the batch teach "
                     f"nothing (their replies scored the same) after MAX_EXTRA_ROLLOUTS = {c['MAX_EXTRA_ROLLOUTS']} "
                     f"extra rounds")
    return notes


def step_time_note(row, c):
    """Where a step's time went (said once, while there is time to change it)."""
    g, s, t, step_s = (row[f"time/{k}_s"] for k in ("generate", "score", "train", "step"))
    return (f"note: step {int(row['step'])} took {step_s:.1f} s: sampling {g:.1f} s (MAX_NEW_TOKENS tokens, one at "
            f"a time), scoring {s:.1f} s (reference, critic, reward), updating {t:.1f} s (PPO_EPOCHS = "
            f"{c['PPO_EPOCHS']} passes of forward and backward); about "
            f"{step_s * (c['TOTAL_STEPS'] - row['step'] + 1) / 60:.0f} min for the steps left to TOTAL_STEPS = "
            f"{c['TOTAL_STEPS']}")


def unended(res, c):
    """A note when most held-out replies of the starting policy run into MAX_NEW_TOKENS."""
    if res["eos_frac"] >= 0.5:
        return ""
    return (f"\nnote: {res['eos_frac']:.0%} of the held-out replies end within MAX_NEW_TOKENS = {c['MAX_NEW_TOKENS']}; "
            f"the rest are cut off and scored unfinished: raise MAX_NEW_TOKENS, or set MISSING_EOS_PENALTY (cut-off "
            f"replies cost) or MASK_TRUNCATED (they teach nothing)")


def checkpoint_size(path, keep, ckpt_dir):
    """What checkpoints cost on disk, said after the first one."""
    gb = os.path.getsize(os.path.join(path, "state.pt")) / 1e9
    return (f"note: a checkpoint takes {gb:.2f} GB (weights and optimizer state); KEEP_CHECKPOINTS = {keep} keeps up "
            f"to {gb * keep:.2f} GB in {ckpt_dir}")


def resume(path, roles, trainer, kl_ctl, score_moments, env, prompt_rng, c, config):
    """Load the checkpoint at `path` into the trained models, optimizer, LR schedule, KL controller, score moments
    and RNGs (this rank's); returns its RunState (with this run's config)."""
    saved = read_checkpoint(path, "state.pt")
    load_trained_state(roles, trainer.optimizer, saved["models"], saved["optimizer"], env.fsdp)
    if "scheduler" in saved:  # checkpoints before LR_SCHEDULE had a constant rate: the new default
        trainer.scheduler.load_state_dict(saved["scheduler"])
    state = RunState(**{f.name: saved[f.name] for f in dataclasses.fields(RunState)  # fields newer than the
                        if f.name != "config" and f.name in saved}, config=config)  # checkpoint keep their defaults
    kl_ctl.value = state.kl_coef
    if score_moments is not None and state.score_moments:
        score_moments.__dict__.update(state.score_moments)
    set_rng_state(saved["rng"][env.rank], prompt_rng)
    env.log(f"resuming from {path}: {state.step} steps done, β {kl_ctl.value:.4f}; the next is step {state.step + 1}")
    if state.step >= c["TOTAL_STEPS"]:
        env.log(f"the run in {c['OUTPUT_DIR']} already has {state.step} steps (TOTAL_STEPS = {c['TOTAL_STEPS']}); "
                f"extend it with --total_steps=N, or start over with --resume=never")
    return state


def ranks_in_sync(kl_coef, roles, fsdp):
    """1.0 when every rank holds the same β and (DDP) the same weights (their checksums); FSDP shards differ."""
    seen = all_gather_list([(kl_coef, None if fsdp else params_checksum(roles.trained().values()))])
    return float(all(x == seen[0] for x in seen))


def diverged(streak, step, ckpt_dir):
    kept = list_checkpoints(ckpt_dir)
    return TrainingDiverged(f"{streak} PPO steps in a row had a non-finite score, loss or gradient (step {step}); "
                            f"the last good checkpoint is {kept[-1] if kept else 'none'}: lower LEARNING_RATE or "
                            f"check the reward model, then resume")


def merge_rollouts(batches, fill):
    """Several rollouts' batches (ppo.rollout) as one, for DYNAMIC_SAMPLING: prompts left-padded to the widest,
    replies right-padded to the longest, each [B, T] tensor with its own padding (fill: {name: value}, else 0)."""
    ctx, T = max(b["context_length"] for b in batches), max(b["responses"].shape[1] for b in batches)

    def widen(b, key):
        x, pad = b[key], torch.nn.functional.pad
        if key in ("query_responses", "attention_mask"):  # [prompt | reply]: the prompt padded left, the reply right
            value, q, r = fill["responses"] if key == "query_responses" else False, x[:, :b["context_length"]], \
                x[:, b["context_length"]:]
            return torch.cat([pad(q, (ctx - q.shape[1], 0), value=value), pad(r, (0, T - r.shape[1]), value=value)], 1)
        return pad(x, (0, T - x.shape[1]), value=fill.get(key, 0.0)) if x.dim() == 2 else x
    out = {k: (torch.cat([widen(b, k) for b in batches]) if torch.is_tensor(v) else
               sum((b[k] for b in batches), []) if isinstance(v, list) else v) for k, v in batches[0].items()}
    return dict(out, context_length=ctx, time_generate=sum(b["time_generate"] for b in batches),
                time_score=sum(b["time_score"] for b in batches))


def describe_sizes(z):
    """One line for the batch sizes (ppo.BatchSizes), said at start."""
    prompts = f"replies ({z.rollout // z.samples} prompts x {z.samples})" if z.samples > 1 else "prompts"
    return (f"rollout batch {z.rollout} {prompts} per PPO step ({z.per_rank} per process); each epoch "
            f"{z.rollout // (z.micro * z.accum * z.world)} optimizer steps of {z.micro * z.accum * z.world} sequences, "
            f"{z.accum} micro-batches of {z.micro} per process")


def next_prompts(state, prompts, sizes, rank, prompt_rng):
    """This rank's share of the next rollout batch, from the shuffled order in `state` (reshuffled when a pass
    ends; the same order on every rank); a prompt's SAMPLES_PER_PROMPT replies are consecutive and on one rank."""
    n = sizes.samples
    per_step, per_rank = sizes.rollout // n, sizes.per_rank // n  # prompts
    if state.cursor + per_step > len(state.order):
        state.order, state.cursor = torch.randperm(len(prompts), generator=prompt_rng).tolist(), 0
    start = state.cursor + rank * per_rank
    state.cursor += per_step
    return [prompts[i] for i in state.order[start:start + per_rank] for _ in range(n)]


def describe(c, env, sizes, roles, params, prompts, eval_prompts, metrics_dir, model_dir, ckpt_dir, cpu_memory):
    """Print the resolved config, derived sizes, notes and models; return them for config.json and the summary
    ({"derived", "models", "data", "files", "columns"}: the CSV columns of this run)."""
    tok, log = roles.tok, env.log
    ref_path = c["REF_MODEL"] or c["ACTOR_MODEL"]
    derived = {"ROLLOUT_BATCH": sizes.rollout, "PER_RANK_BATCH": sizes.per_rank,
               "PROMPTS_PER_STEP": sizes.rollout // sizes.samples, "world_size": sizes.world,
               "device": str(env.device), "dtype": str(env.dtype).replace("torch.", ""), "REF_MODEL": ref_path,
               "CRITIC_MODEL": roles.critic_path, "threads": env.threads, "cpu_memory": cpu_memory}
    log("config:", " ".join(f"{k}={v!r}" for k, v in c.items()))
    log("derived:", " ".join(f"{k}={v}" for k, v in derived.items()))
    log("batch:", describe_sizes(sizes))
    for n in roles.notes:
        log("note:", n)
    if env.device.type == "cpu" and env.dtype == torch.float32 and c["DTYPE"] == "auto" and \
            roles.actor.num_parameters() >= 10_000_000 and cpu_multiplies_bf16():
        log("note: this CPU multiplies in bfloat16 natively (AVX512-BF16 or AMX): --dtype=bfloat16 (autocast over "
            "fp32 weights) took 0.60-0.67x the step time of float32 on 13.5M- and 135M-parameter models (README, "
            "\"bf16 on a CPU\")")
    if c["ENTROPY_COEF"] and not c["ENTROPY_FLOOR"] and c["ADVANTAGE"] != "gae":
        log(f"note: an entropy bonus without a floor (ENTROPY_FLOOR = 0) with ADVANTAGE = {c['ADVANTAGE']!r}: on the "
            f"demo 0.07 made grpo diverge (held-out KL 26-61 nats; README, \"The repeater across replies\"); watch "
            f"objective/kl")
    log("stop tokens (a reply ends at any):",
        ", ".join(f"{tok.convert_ids_to_tokens(i)!r} ({i})" for i in roles.stop_ids))
    trained = sum(p.numel() for p in params)
    reward = ("a function" if roles.rm is None else "model, same tokenizer" if roles.rm.same_tokenizer else
              "model, own tokenizer (re-tokenising replies)" + (", own pooling" if roles.rm.model.own_pooling else ""))
    reward += " + REWARD_FN" if c["REWARD_FN"] else ""
    lora = f" (LoRA rank {c['LORA_R']}: adapters{' and value head' if roles.critic else ''})" if roles.adapters else ""
    shared = [f"{name} = {of} with its adapters off" for name, role, of in
              (("reference", roles.ref, "actor"), ("reward", roles.rm and roles.rm.model, "critic"))
              if isinstance(role, AdaptersOff)]
    critic_params = roles.critic.model.num_parameters() if roles.critic is not None else 0
    critic = f"critic {critic_params:,}" if roles.critic is not None else f"no critic ({c['ADVANTAGE']})"
    log(f"models: actor {roles.actor.num_parameters():,} params, {critic}; trained {trained:,}{lora}, reward "
        f"{reward}; prompts: {len(prompts)} train, {len(eval_prompts)} eval")
    for line in shared:
        log(f"note: the {line} (LoRA: one model in memory for both roles)")
    models = {"actor": c["ACTOR_MODEL"], "reference": ref_path, "reward": c["REWARD_MODEL"],
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
    data = {"prompt_file": c["PROMPT_FILE"], "train_prompts": len(prompts), "eval_file": c["EVAL_FILE"],
            "eval_prompts": len(eval_prompts)}
    files = {"curves": os.path.join(metrics_dir, "training_curves.png"),
             "metrics_csv": os.path.join(metrics_dir, "training_metrics.csv"),
             "config": os.path.join(metrics_dir, "config.json"), "samples": os.path.join(metrics_dir, "samples.jsonl"),
             "checkpoints": ckpt_dir, "model": model_dir if c["SAVE_MODEL"] else None}
    columns = run_columns(c, roles.critic is not None, dist_on())
    return {"derived": derived, "models": models, "data": data, "files": files, "columns": columns}


LOCK_FILE = ".ppo-rlhf.lock"  # in OUTPUT_DIR while a run writes there: the process id of the run


@contextlib.contextmanager
def hold_output_dir(c, env, dashboards):
    """OUTPUT_DIR for this run alone while it writes, and its dashboards, both given back on every way out. The lock
    file holds the writing run's process id (rank 0's: a torchrun job holds one lock for all its ranks); a second
    run refuses in one line naming it, and a lock left by a run that is no longer running (kill -9) is taken over
    with a note. Taken before the run writes anything, so a refused run changes nothing."""
    path = os.path.join(c["OUTPUT_DIR"], LOCK_FILE)
    on_rank_0(env, lambda: take_lock(path, c["OUTPUT_DIR"], env.log), "lock OUTPUT_DIR")
    try:
        with dashboards:
            yield
    finally:
        if env.master and lock_owner(path) == os.getpid():
            os.remove(path)


def on_rank_0(env, fn, what):
    """fn() on rank 0 alone; a ConfigError it raises stops every rank (a collective: all ranks call this), with
    rank 0's line (only rank 0 prints)."""
    failure = None
    if env.master:
        try:
            fn()
        except ConfigError as e:
            failure = e
    if dist_on() and all_reduce_sum(torch.tensor([float(failure is not None)], device=DIST_DEVICE)).item():
        failure = failure or ConfigError(f"rank 0 could not {what}")
    if failure:
        raise failure


def take_lock(path, output_dir, log):
    for _ in range(3):
        try:  # O_EXCL: of two runs that start together, exactly one creates the file
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid = lock_owner(path)
            if pid is not None and pid != os.getpid() and process_alive(pid):
                raise ConfigError(f"OUTPUT_DIR {output_dir!r} is in use by another run (process {pid}, which holds "
                                  f"{path}); wait for it to end or stop it, or give this run its own "
                                  f"--output_dir") from None
            if pid != os.getpid():
                log(f"note: {path} was left by process {pid}, which is no longer running; taking it over")
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return
    raise ConfigError(f"OUTPUT_DIR {output_dir!r}: cannot take {path} (another run keeps taking it); try again")


def lock_owner(path):
    """The process id in a lock file, or None (no file, or not a number: a lock cut short)."""
    try:
        with open(path, encoding="utf-8") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def process_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: no signal, only the check that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class MetricsCsv:
    """training_metrics.csv, written under a .tmp name with the rows so far (a resumed run's, from its checkpoint),
    renamed into place, then appended row by row: a crash loses at most the step in flight."""

    def __init__(self, path, rows):
        self.file = open(path + ".tmp", "w", newline="", encoding="utf-8")
        self.writer = None
        if rows:
            self.write(rows)
        os.replace(path + ".tmp", path)

    def write(self, rows):
        if self.writer is None:
            self.writer = csv.DictWriter(self.file, fieldnames=list(rows[0]))
            self.writer.writeheader()
        self.writer.writerows(rows)
        self.file.flush()

    def close(self):
        self.file.close()


def open_csv(c, state, about, dashboards, resume_path, move_aside, ckpt_dir, master, log):
    """The first writes of a run, on rank 0: the dashboards first (a login or network failure is one line before any
    earlier output is touched), earlier checkpoints of another config moved aside (never deleted), config.json,
    the CSV. Returns the MetricsCsv (None on the other ranks)."""
    if not master:
        return None
    dashboards.open(c["OUTPUT_DIR"], {"config": state.config, "derived": about["derived"]})
    if not resume_path and state.eval_before:
        dashboards.log(eval_columns(state.eval_before), 0)
    if move_aside:
        aside = f"{ckpt_dir}_before_{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(ckpt_dir, aside)
        log(f"note: the earlier checkpoints are kept in {aside}")
    files = about["files"]
    atomic_write(files["config"], lambda f: json.dump({"config": state.config, "derived": about["derived"]}, f,
                                                      indent=1))
    if not resume_path and os.path.exists(files["samples"]):
        os.remove(files["samples"])
    return MetricsCsv(files["metrics_csv"], state.rows)


def write_samples(path, step, prompts, batch, dashboards):
    """A few of the step's replies with their scores, appended to samples.jsonl (and the dashboards)."""
    samples = [{"step": step, "prompt": p.conv, "reply": r, "score": round(sc, 4)}
               for p, r, sc in list(zip(prompts, batch["replies"], batch["scores"].tolist()))[:4]]
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(x) + "\n" for x in samples)
    dashboards.samples(samples, step)


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


def trained_state(roles, optimizer, fsdp):
    """(model state, optimizer state) of what trains: actor + critic, under LoRA their adapters and value head only
    (the frozen base is the model on disk). Under FSDP gathered in full to the CPU (a collective)."""
    pair = torch.nn.ModuleDict(roles.trained())
    if not fsdp:
        model_state, optim_state = pair.state_dict(), optimizer.state_dict()
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        model_state, optim_state = get_state_dict(pair, optimizer,
                                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if roles.adapters:
        trained = {name for name, p in pair.named_parameters() if p.requires_grad}
        model_state = {k: v for k, v in model_state.items() if k in trained}
    return model_state, optim_state


def load_trained_state(roles, optimizer, model_state, optim_state, fsdp):
    pair = torch.nn.ModuleDict(roles.trained())
    if not fsdp:
        pair.load_state_dict(model_state, strict=not roles.adapters)  # LoRA: the frozen base is not in the file
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    set_state_dict(pair, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True, strict=not roles.adapters))


def list_checkpoints(ckpt_dir):
    """Finished checkpoints, oldest first (a half-written one still has its .tmp name and is ignored)."""
    if not os.path.isdir(ckpt_dir):
        return []
    names = sorted(n for n in os.listdir(ckpt_dir) if re.fullmatch(r"step_\d{8}", n))
    return [os.path.join(ckpt_dir, n) for n in names if os.path.isfile(os.path.join(ckpt_dir, n, "meta.json"))]


def incomplete_checkpoints(ckpt_dir):
    """Checkpoint folders a stopped run left half-written: a .tmp folder never renamed, or one without meta.json."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(os.path.join(ckpt_dir, n) for n in os.listdir(ckpt_dir) if re.fullmatch(r"step_\d{8}\.tmp", n)
                  or re.fullmatch(r"step_\d{8}", n) and not os.path.isfile(os.path.join(ckpt_dir, n, "meta.json")))


def tensor_bytes(obj):
    """The bytes of every tensor in a nested state (dicts, lists): what torch.save will write, about."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    return sum(tensor_bytes(v) for v in obj) if isinstance(obj, (list, tuple)) else 0


def no_space(path, needed, newest):
    """The one line for a full disk: what was needed, what is free, what still resumes the run."""
    free = shutil.disk_usage(path).free
    return ConfigError(f"no space left on the device for {path} (about {needed / 2**20:.0f} MB needed, "
                       f"{free / 2**20:.0f} MB free); free some space or lower --keep_checkpoints, then run the same "
                       f"command again: " + (f"the newest checkpoint, {newest}, resumes the run" if newest else
                                             "no checkpoint was written yet"))


def save_checkpoint(ckpt_dir, keep, state, roles, trainer, prompt_rng, env):
    """Write OUTPUT_DIR/checkpoints/step_XXXXXXXX/state.pt (models, optimizer, LR schedule, every rank's RNG, the
    RunState) atomically (a .tmp folder, then rename); keep the newest `keep`, deleting older ones only once the new
    one is complete. Every rank takes part (its RNG state; FSDP gathers the shards); rank 0 writes, and when it
    cannot (a full disk) every rank stops with its error."""
    model_state, optim_state = trained_state(roles, trainer.optimizer, env.fsdp)
    saved = {"models": model_state, "optimizer": optim_state, "scheduler": trainer.scheduler.state_dict(),
             "rng": all_gather_list([rng_state(prompt_rng)]), **vars(state)}
    final = os.path.join(ckpt_dir, f"step_{state.step:08d}")

    def write():
        write_checkpoint(final, saved, {"step": state.step, "config": state.config})
        for old in list_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(old)
    on_rank_0(env, write, "write the checkpoint")
    return final


def write_checkpoint(final, saved, meta):
    """state.pt and meta.json into final + ".tmp", then renamed to final. A disk too full for it is one clear line,
    checked before writing and caught while writing; the half-written folder is removed, and the earlier checkpoints
    stay as they were."""
    ckpt_dir, tmp = os.path.dirname(final), final + ".tmp"
    needed, newest = tensor_bytes(saved) + 2**20, (list_checkpoints(ckpt_dir) or [None])[-1]
    os.makedirs(ckpt_dir, exist_ok=True)
    if shutil.disk_usage(ckpt_dir).free < needed:
        raise no_space(ckpt_dir, needed, newest)
    try:
        os.makedirs(tmp, exist_ok=True)
        torch.save(saved, os.path.join(tmp, "state.pt"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:  # read without loading the weights
            json.dump(meta, f, indent=1)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        if getattr(e, "errno", None) == errno.ENOSPC or shutil.disk_usage(ckpt_dir).free < needed:
            raise no_space(ckpt_dir, needed, newest) from None
        raise
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(tmp, final)


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


def config_differences(saved, c, defaults):
    """Settings that differ between a checkpoint's config and this run's, ignoring those a resume may change. A
    setting newer than the checkpoint counts only when set away from its default: every new setting's default keeps
    what the earlier release computed, so a run started before an upgrade resumes after it."""
    return [f"{k} {saved.get(k)!r} -> {c[k]!r}" for k in defaults
            if k not in RESUMABLE_CHANGES and saved.get(k) != c[k] and (k in saved or c[k] != defaults[k])]


def choose_checkpoint(c, defaults, ckpt_dir, log):
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
        diff = config_differences(read_checkpoint(path, "meta.json").get("config", {}), c, defaults)
        if diff:
            raise ConfigError(f"checkpoint {path} comes from a different config ({'; '.join(diff[:3])}); resume with "
                              f"its settings, or start over with --resume=never")
        return path, False
    found = list_checkpoints(ckpt_dir)
    for half in incomplete_checkpoints(ckpt_dir):
        log(f"note: {half} is incomplete (a run stopped while writing it) and is skipped; "
            + (f"the newest complete one is {found[-1]}" if found else "there is no complete one"))
    if not found:
        return None, False
    diff = config_differences(read_checkpoint(found[-1], "meta.json").get("config", {}), c, defaults)
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


def resume_command(c, defaults):
    """The command that continues this run: RESUME=auto finds the checkpoint, the overrides are those of this run."""
    args = [f"--{k.lower()}={c[k]}" for k in defaults if c[k] != defaults[k]]
    launcher = "torchrun --nproc_per_node N" if dist_on() else "python"
    return " ".join([launcher, "code/ppo.py"] + args)


def save_models(roles, model_dir, env):
    """save_pretrained of actor and critic, each beside the actor's tokenizer, as models a user loads and runs as they
    are: the tokenizer as loaded (its pad a real token), the actor's generation_config ending replies at the run's
    stop tokens, no id of the trainer's own. Under FSDP the full weights are gathered to rank 0 first.
    Under LoRA the adapters are saved in peft's format (actor_adapter, critic_adapter: PeftModel.from_pretrained on
    the base model) and actor and critic as plain models, the adapters merged in (W + B·A·alpha/r, in the base's
    dtype): into the running model at the end of the run, a layer at a time (under FSDP into the base loaded again
    on the CPU). Returns the peak memory of saving (MiB)."""
    memory = {}
    with peak_memory(env.device, memory, "saving"):
        write_models(roles, model_dir, env)
    return memory["saving"]


def write_models(roles, model_dir, env):
    actor, tok, stop_ids = roles.actor, roles.tok, roles.stop_ids
    actor.generation_config.eos_token_id = stop_ids[0] if len(stop_ids) == 1 else list(stop_ids)
    actor.generation_config.pad_token_id = tok.pad_token_id
    for name, m in [("actor", actor)] + ([("critic", roles.critic.model)] if roles.critic is not None else []):
        adapter = roles.adapters.get(name)
        state = None
        if env.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            state = get_model_state_dict(adapter.peft if adapter else m,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not env.master:
            continue
        if adapter:
            from peft import PeftModel
            folder = os.path.join(model_dir, f"{name}_adapter")
            adapter.peft.save_pretrained(folder, state_dict=state)
            if env.fsdp:  # the full weights were gathered to rank 0's CPU: merged into the base loaded again
                m, state = PeftModel.from_pretrained(adapter.load_base(), folder).merge_and_unload(), None
            else:  # merged at the end of the run, a layer at a time: no second copy of the base in memory;
                # safe_merge adds into a copy of each weight, as the critic may read the actor's (share_frozen_base)
                m = adapter.peft.merge_and_unload(safe_merge=True)
            m.generation_config, m.config.pad_token_id = actor.generation_config, tok.pad_token_id
        m.save_pretrained(os.path.join(model_dir, name), state_dict=state)
        tok.save_pretrained(os.path.join(model_dir, name))


# ---- reporting: the metrics table, CSV rows, curves, summary with health verdicts -----------------------------------
# Every metric a run logs, named once: how it is reduced, the curve panel that plots it (title, label) or None, and
# whether summary.json summarises it ("max" / "min": which end is best). The CSV columns (in this order), the curves,
# the summary and the health verdicts all read this table. Reductions: "once" = the same number on every rank;
# "batch" = mean over the rollout batch of all ranks; "micro" = mean over the micro-batches of the step and the ranks;
# "optim" = mean over the optimizer steps and ranks; "time" = seconds (or tokens/s), mean over ranks; "eval" = the
# held-out evaluation at EVAL_EVERY steps, NaN in between; "dist" = only under torchrun. Metrics a run does not
# compute are not among its columns (LOGGED_WHEN), not columns of NaN.
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
    "policy/clipfrac_low": ("micro", None, None),
    "policy/clipfrac_high": ("micro", None, None),
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
    "mem/rollout_mb": ("time", None, None),
    "mem/update_mb": ("time", None, None),
    "eval/rm_score": ("eval", None, None),
    "eval/gold_score": ("eval", None, None),
    "eval/kl": ("eval", None, None),
    "eval/distinct_1": ("eval", None, None),
    "eval/distinct_2": ("eval", None, None),
    "eval/ent_2": ("eval", None, None),
    "train/bad_scores": ("once", None, None),
    "train/critic_warmup": ("once", None, None),
    "train/groups_dropped": ("batch", None, None),
    "train/extra_rollouts": ("once", None, None),
    "train/groups_short": ("batch", None, None),
    "time/extra_sampling_s": ("time", None, None),
    "dist/ranks_in_sync": ("dist", None, None),
    "time/step_s": ("time", None, None),
}
LOGGED_WHEN = {"loss/value_avg": "critic", "val/clipfrac_avg": "critic", "val/explained_var": "critic",
               "val/mean_value": "critic", "loss/kl_avg": "kl_in_loss", "dist/ranks_in_sync": "torchrun",
               "policy/clipfrac_low": "clip_higher", "policy/clipfrac_high": "clip_higher",
               "train/critic_warmup": "critic_warmup", "train/groups_dropped": "dynamic",
               "train/extra_rollouts": "dynamic", "train/groups_short": "dynamic", "time/extra_sampling_s": "dynamic"}
PANELS = [REWARD, KL_PANEL, "β (KL coefficient)", "policy loss", "value loss", CLIP, "entropy (nats/token)",
          "reply length (tokens)"]  # the figure's order; a last panel shows the held-out evaluation


def eval_columns(ev):
    """A held-out evaluation as the CSV's eval/ columns."""
    return {"eval/rm_score": ev["rm_score"], "eval/gold_score": ev.get("gold_score", float("nan")), "eval/kl": ev["kl"],
            **{f"eval/{k}": ev[k] for k in ("distinct_1", "distinct_2", "ent_2")}}


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

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

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
                "| " + " | ".join(str(v).replace("|", "/").replace("\n", " ") for v in row) + " |" for row in cells),
                step)
        if self.wb:
            import wandb
            self.wb.log({"samples": wandb.Table(columns=["prompt", "reply", "score"], data=cells)}, step=step)

    def close(self):
        if self.tb:
            self.tb.close()
        if self.wb:
            self.wb.finish()
        self.tb = self.wb = None


def run_columns(c, critic, torchrun):
    """The CSV columns of a run, in METRICS order: value metrics with a critic, the KL loss term with KL_IN = loss,
    dist/ columns under torchrun, each side's clip fraction with CLIP_RANGE_HIGH, which steps were critic warm-up
    with CRITIC_WARMUP_STEPS; everything else always."""
    have = {"critic": critic, "kl_in_loss": c["KL_IN"] == "loss", "torchrun": torchrun,
            "clip_higher": bool(c["CLIP_RANGE_HIGH"]), "critic_warmup": bool(c["CRITIC_WARMUP_STEPS"]),
            "dynamic": c["DYNAMIC_SAMPLING"]}
    return [name for name in METRICS if have.get(LOGGED_WHEN.get(name), True)]


def metrics_row(values, columns):
    """The CSV row of one step: each of the run's columns, NaN where not measured this step (an evaluation between
    EVAL_EVERY steps, a step whose update was skipped). A value outside the run's columns is a bug."""
    undeclared = set(values) - set(columns)
    assert not undeclared, f"metrics missing from METRICS (or from this run's columns): {sorted(undeclared)}"
    return {name: values.get(name, float("nan")) for name in columns}


def atomic_write(path, write):
    """write(f) into path.tmp, then rename: a reader never sees half a file, a crash never corrupts the old one."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        write(f)
    os.replace(tmp, path)


def smooth(series):
    """Centred rolling mean over ~1/20 of the run (no lag, unlike an EMA); NaN gaps are skipped."""
    return series.rolling(max(1, len(series) // 20), center=True, min_periods=1).mean()


def plot_curves(df, path, target, eval_points, rm="RM", floor=0.0):
    """One figure, read at a glance: smoothed lines over faint raw points, one panel per PANELS entry (the metrics
    METRICS assigns to it), and the held-out evaluation. rm: what the score is called ("RM", "reward-function");
    floor: the entropy floor of the bonus (0: none drawn)."""
    fig, axes = plt.subplots(3, 3, figsize=(15, 11))
    x = df["step"]
    for ax, title in zip(axes.flat, PANELS):
        series = [(name, panel[1]) for name, (_, panel, _) in METRICS.items() if panel and panel[0] == title]
        for i, (col, label) in enumerate(series):
            if col not in df or df[col].isna().all():
                continue
            color = f"C{i}"
            ax.plot(x, df[col], ".", color=color, alpha=0.25, markersize=3)
            ax.plot(x, smooth(df[col]), "-", color=color, label=label.replace("RM", rm), linewidth=1.8)
        if title == KL_PANEL:
            ax.axhline(target, color="k", linestyle="--", linewidth=1, label=f"target {target:g}")
        if title == "entropy (nats/token)" and floor:
            ax.axhline(floor, color="k", linestyle="--", linewidth=1, label=f"floor {floor:.2f} (ENTROPY_FLOOR)")
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
                ax.plot(steps, [p[key] for p in eval_points], "o-", color=f"C{i}",
                        label=key.replace("_", " ").replace("rm", rm))
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("PPO-RLHF training curves")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def entropy_floor(rows, c):
    """ENTROPY_FLOOR x the policy's entropy at the first step that measured it (nats per token; read from the CSV's
    rows, so a resumed run holds the same floor), or 0: before that step, or with no floor or no entropy bonus."""
    first = next((h for h in (r.get("policy/entropy_avg", math.nan) for r in rows) if math.isfinite(h)), None)
    return c["ENTROPY_FLOOR"] * first if first is not None and c["ENTROPY_COEF"] else 0.0


def verdict_window(n):
    """Rows at each end of an n-step run that the verdicts compare: a tenth, but at least min(5, n // 2), so that a
    short run's ends are means of several steps, not one step each."""
    return max(1, n // 10, min(5, n // 2))


def window_mean(part, col):
    """Mean of a METRICS column over part of the run; NaN where it was never measured."""
    assert col in METRICS, col
    return float(part[col].mean()) if col in part and part[col].notna().any() else float("nan")


def clearly_rose(first, last, col):
    """The end's mean above the start's by more than 2 standard errors of their difference (the steps' noise)."""
    a, b = first[col].dropna(), last[col].dropna()
    noise = 2 * math.sqrt(a.var(ddof=0) / max(1, len(a)) + b.var(ddof=0) / max(1, len(b)))
    return b.mean() - a.mean() > noise


def health_verdicts(df, c, eval_before, eval_after, rm="RM"):
    """Plain-language verdicts drawn from the run: what looks fine and what to check, each with its numbers and,
    where one helps, the setting to change. c: the run's config; rm names the reward's source ("RM", or
    "reward-function" when REWARD_MODEL is a .py file)."""
    if len(df) == 0:
        return ["no PPO step finished"]
    k, f = verdict_window(len(df)), window_mean
    first, last = df.iloc[:k], df.iloc[-k:]
    out = [] if len(df) >= 10 else [f"NOTE: only {len(df)} steps: the verdicts compare the mean of the first {k} "
                                    f"with the mean of the last {k}; too few to tell a trend from noise"]
    out.append(kl_verdict(df, last, c))
    s0, s1 = f(first, "objective/scores"), f(last, "objective/scores")
    out.append(f"{'OK' if s1 > s0 else 'CHECK'}: {rm} score {'rose' if s1 > s0 else 'did not rise'} from {s0:.2f} "
               f"to {s1:.2f}")
    e0, e1 = f(first, "policy/entropy_avg"), f(last, "policy/entropy_avg")
    if e1 < 0.3 * e0:
        out.append(f"WARNING: entropy collapsed from {e0:.2f} to {e1:.2f} nats/token: the policy is nearly "
                   f"deterministic; raise INIT_KL_COEF or lower LEARNING_RATE")
    l0, l1 = f(first, "resp/length_mean"), f(last, "resp/length_mean")
    if l1 < 0.5 * l0 or l1 < 3:
        out.append(f"WARNING: replies shrank from {l0:.1f} to {l1:.1f} tokens: possible reward hacking by short "
                   f"replies")
    r0, r1 = f(first, "resp/repetition"), f(last, "resp/repetition")
    if r1 > r0 + 0.1:
        out.append(f"WARNING: repetition rose from {r0:.2f} to {r1:.2f} (复读机): the reward model pays for repeats; "
                   f"keep the KL leash (ADAPTIVE_KL, INIT_KL_COEF) or fix the reward model")
    cf = f(last, "policy/clipfrac_avg")
    if cf > 0.3:
        out.append(f"CHECK: clipfrac {cf:.2f} is high: updates hit the trust region often; lower LEARNING_RATE or "
                   f"PPO_EPOCHS")
    ev = f(last, "val/explained_var")
    if ev < 0.05:
        out.append(f"CHECK: value explained variance {ev:.2f} (mean value {f(last, 'val/mean_value'):.2f}, mean "
                   f"score {s1:.2f}): the critic predicts the returns {'worse than' if ev < 0 else 'no better than'} "
                   f"their mean, so the advantages are little more than whitened rewards; " + (
                       "at the actor's rate a critic may learn too slowly (a fresh value head starts from 0): give "
                       "it CRITIC_WARMUP_STEPS (e.g. 10) and a CRITIC_LEARNING_RATE (e.g. 10 x LEARNING_RATE), or go "
                       "critic-free (ADVANTAGE = grpo or rloo)"
                       if not (c["CRITIC_WARMUP_STEPS"] or c["CRITIC_LEARNING_RATE"]) else
                       "with CRITIC_WARMUP_STEPS / CRITIC_LEARNING_RATE set already, give it more warm-up steps or a "
                       "larger rollout batch (MINI_BATCH_SIZE, PPO_BUFFER_SIZE), or go critic-free (ADVANTAGE = grpo)"))
    q0, q1 = f(first, "resp/eos_frac"), f(last, "resp/eos_frac")
    if q1 < 0.5 and q1 < q0 - 0.1 or q1 < 0.1:
        out.append(f"WARNING: {q1:.0%} of replies end with a stop token (at the start: {q0:.0%}); the others are cut "
                   f"off at MAX_NEW_TOKENS = {c['MAX_NEW_TOKENS']} and scored unfinished: raise MAX_NEW_TOKENS, or "
                   f"make cut-off replies cost (MISSING_EOS_PENALTY, e.g. 1) or teach nothing (MASK_TRUNCATED)")
    n_bad = int((df["train/bad_scores"] > 0).sum()) if "train/bad_scores" in df else 0
    n_skip = int((df["train/skipped_frac"] > 0).sum()) if "train/skipped_frac" in df else 0
    if n_bad or n_skip:
        out.append(f"WARNING: non-finite numbers: {n_bad} steps had a NaN/Inf score (not trained on), {n_skip} steps "
                   f"skipped updates for a NaN/Inf loss or gradient; check the reward model, lower LEARNING_RATE")
    if "dist/ranks_in_sync" in df and (df["dist/ranks_in_sync"] < 1).any():
        out.append("WARNING: the ranks' weights or β diverged at some step (dist/ranks_in_sync = 0); results are not "
                   "those of one consistent model")
    out += gold_verdicts(first, last, eval_before, eval_after, rm)
    if eval_before and eval_after:
        out.append(f"held-out {rm} score {eval_before['rm_score']:.2f} -> {eval_after['rm_score']:.2f}"
                   + (f", gold {eval_before['gold_score']:.2f} -> {eval_after['gold_score']:.2f}"
                      if "gold_score" in eval_before else "")
                   + f", KL {eval_after['kl']:.2f}")
    return out


def kl_verdict(df, last, c):
    """The KL to the reference at the end of the run against PPO_TARGET, and what β did."""
    kl, target = window_mean(last, "objective/kl"), c["PPO_TARGET"]
    if window_mean(df, "objective/kl") < -0.5 or kl < -0.5:
        return (f"WARNING: mean KL is negative ({kl:.2f}): sampling and scoring disagree; check that generation uses "
                f"plain temperature sampling (no top-k/top-p) and the same TEMPERATURE as the logprobs")
    if abs(kl - target) <= 0.5 * target:
        beta = window_mean(last, "objective/kl_coef")
        return f"OK: KL {kl:.2f} nats/reply is near the target {target:g} (β now {beta:.3f})"
    if kl > target:
        return (f"CHECK: KL {kl:.2f} is above the target {target:g}: the policy drifts from the reference faster than "
                f"β can follow; lower LEARNING_RATE or KL_HORIZON")
    if kl < 0:
        return f"CHECK: KL {kl:.2f} is slightly negative"
    return (f"OK: KL {kl:.2f} is below the target {target:g}: the policy stays close to the reference; "
            + controller_reach(df, c))


def gold_verdicts(first, last, eval_before, eval_after, rm):
    """Over-optimisation: the RM score clearly rose (in training: beyond the steps' noise) while the gold score did
    not rise at all, in training or held out. Scale-free, so a reward in [-1, 1] is judged as the demo's is."""
    s0, s1 = window_mean(first, "objective/scores"), window_mean(last, "objective/scores")
    g0, g1 = window_mean(first, "objective/gold_scores"), window_mean(last, "objective/gold_scores")
    if math.isnan(g0):
        return []
    pairs = [("training", s0, s1, g0, g1, clearly_rose(first, last, "objective/scores"))]
    if eval_before and eval_after and "gold_score" in eval_before:
        r0, r1 = eval_before["rm_score"], eval_after["rm_score"]
        pairs.append(("held out", r0, r1, eval_before["gold_score"], eval_after["gold_score"], r1 > r0))
    hacked = [f"{name}: {rm} {rm0:.2f} -> {rm1:.2f}, gold {gd0:.2f} -> {gd1:.2f}"
              for name, rm0, rm1, gd0, gd1, up in pairs if up and gd1 <= gd0]
    if hacked:
        return [f"WARNING: the {rm} score rose but the gold score did not ({'; '.join(hacked)}): over-optimisation "
                f"of the reward (reward hacking); keep the KL leash tighter (ADAPTIVE_KL, a lower PPO_TARGET, a larger "
                f"INIT_KL_COEF) or stop earlier"]
    return [f"{'OK' if g1 >= g0 else 'CHECK'}: gold score {g0:.2f} -> {g1:.2f}"]


def controller_reach(df, c):
    """What the adaptive KL controller did, and could do at this batch size: each step moves β by a factor of at most
    1 ± 0.2 x ROLLOUT_BATCH / KL_HORIZON (OAI's proportional controller, error clipped to ±0.2)."""
    if "objective/kl_coef" not in df:
        return "β was not logged"
    b0, b1 = float(df["objective/kl_coef"].iloc[0]), float(df["objective/kl_coef"].iloc[-1])
    if not c["ADAPTIVE_KL"]:
        return f"β is fixed at {b1:.3f} (ADAPTIVE_KL = False)"
    n = float(df["episodes"].iloc[0] / df["step"].iloc[0]) if "episodes" in df else float("nan")
    most = 0.2 * n / c["KL_HORIZON"]
    reach = f"β {b0:.3f} -> {b1:.3f}; at {n:.0f} replies per step and KL_HORIZON = {c['KL_HORIZON']} the " \
            f"controller moves β by at most {most:.1%} per step"
    if (1 - most) ** len(df) > 0.5:
        reach += f" (x{(1 - most) ** len(df):.2f} at most over these {len(df)} steps: it has hardly acted; a " \
                 f"smaller KL_HORIZON lets it)"
    return reach


def diversity(replies):
    """How different replies are from one another (the 复读机 across replies, unseen by ppo.repetition_rate): distinct-1/2,
    the share of their token n-grams that are distinct (Li et al. 2016, arXiv:1510.03055), and ent-2, the entropy in
    nats of their bigrams (Zhang et al. 2018, arXiv:1809.05972: also how evenly used). replies: token id lists."""
    out = {}
    for n in (1, 2):
        grams = [tuple(r[i:i + n]) for r in replies for i in range(len(r) - n + 1)]
        out[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else 0.0
    counts = np.array(list(collections.Counter(grams).values()), dtype=np.float64)  # bigrams, from the last pass
    p = counts / counts.sum() if len(counts) else counts
    out["ent_2"] = float(-(p * np.log(p)).sum())
    return out


def diversity_verdict(eval_before, eval_after, c, floor=0.6):
    """Whether the held-out replies stayed diverse across prompts: distinct-2 after training against `floor` x the
    starting policy's (a policy that answers every prompt with one template passes the within-reply repetition
    check, not this one). The advice is what was measured on the demo (README, "The repeater across replies"): the
    entropy bonus with a floor kept it for GAE and GRPO; without a floor it made critic-free runs diverge."""
    if not (eval_before and eval_after and "distinct_2" in eval_before and "distinct_2" in eval_after):
        return []
    d0, d1, e0, e1 = (eval_before["distinct_2"], eval_after["distinct_2"], eval_before["ent_2"], eval_after["ent_2"])
    ratio = d1 / d0 if d0 > 0 else float("nan")
    numbers = (f"held-out distinct-2 {d0:.3f} -> {d1:.3f} ({ratio:.2f} x the starting policy's), ent-2 {e0:.2f} -> "
               f"{e1:.2f}")
    if ratio < floor:
        leash = "keep the KL leash tighter (a lower PPO_TARGET, a larger INIT_KL_COEF)"
        if not c["ENTROPY_COEF"]:
            fix = f"turn the entropy bonus on (ENTROPY_COEF with ENTROPY_FLOOR, the defaults) or {leash}"
        elif not c["ENTROPY_FLOOR"]:
            fix = f"give the entropy bonus a floor (ENTROPY_FLOOR; without one it made grpo diverge) or {leash}"
        else:
            fix = (f"hold the entropy higher (ENTROPY_FLOOR = {c['ENTROPY_FLOOR']:g} closer to 1, or a larger "
                   f"ENTROPY_COEF than {c['ENTROPY_COEF']:g}) or {leash}")
        return [f"WARNING: {numbers}: the policy gives many prompts the same reply (复读机 across replies); {fix}"]
    return [f"OK: {numbers}"]


def summarise(df, key, best):
    """A metric over the run: mean of the first and last tenth, and its best value (max or min, from METRICS)."""
    if key not in df or df[key].notna().sum() == 0:
        return None
    k = max(1, len(df) // 10)
    col = df[key].dropna()
    return {"start": float(col.iloc[:k].mean()), "end": float(col.iloc[-k:].mean()),
            "best": float(col.max() if best == "max" else col.min())}


def memory_summary(df, memory):
    """Peak memory (MiB) of each phase of this session: loading, the rollouts and updates (the CSV's mem/ columns),
    the evaluations, saving; "peak" = the largest, or the process's own peak when that is larger."""
    phases = dict(memory)
    for k in ("rollout", "update"):
        if f"mem/{k}_mb" in df and df[f"mem/{k}_mb"].notna().any():
            phases[k] = float(df[f"mem/{k}_mb"].max())
    phases["peak"] = max([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024] +  # Linux: KiB
                         [v for v in phases.values() if math.isfinite(v)])
    return {k: round(v, 1) for k, v in phases.items()}


def build_summary(status, state, c, defaults, about, notes, eval_after=None, detail_after=None, memory=None):
    """summary.json: the run at a glance, health verdicts first. about: describe()'s derived, models, data, files."""
    df = pd.DataFrame(state.rows)
    derived, models = about["derived"], about["models"]
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
        "health": health_verdicts(df, c, eval_before, eval_after,
                                  "reward-function" if models.get("reward_is_function") else "RM")
        + diversity_verdict(eval_before, eval_after, c),
        "eval_before": eval_before, "eval_after": eval_after, "eval_points": state.eval_points,
        "metrics": {k: summarise(df, k, best) for k, (_, _, best) in METRICS.items() if best},
        "steps": state.step, "episodes": state.step * derived["ROLLOUT_BATCH"],
        "wall_time_s": round(state.wall_s, 2),
        "time_split_s": {k: round(v, 2) for k, v in state.timing.items()},
        "step_time_s_median": float(df["time/step_s"].median()) if len(df) else None,
        "resume_command": resume_command(c, defaults) if status != "finished" else None,
        "memory_mb": memory_summary(df, memory or {}),
        "models": models, "data": about["data"], "samples": samples, "files": about["files"],
        "worked_example": state.worked_example,
        "config": {k: c[k] for k in defaults}, "derived": derived, "notes": notes,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
    }


def group_rows(batch, i, n, estimator):
    """The worked example of a critic-free run: each reply of row i's group of n, its total reward, its baseline
    (RLOO: the mean of the others; GRPO: the group's mean) and its advantage."""
    g = list(range(i // n * n, i // n * n + n))
    totals = torch.where(batch["mask"], batch["rewards"], 0.0).sum(1)[g]
    return [{"reply": batch["replies"][j], "reward": totals[k].item(),
             "baseline": (totals.sum() - totals[k]).item() / (n - 1) if estimator == "rloo" else totals.mean().item(),
             "advantage": batch["advantages"][j, 0].item(), "shown": j == i} for k, j in enumerate(g)]


def write_worked_example(path, examples):
    """worked_example.md: each kept step's reply, what happened to it in the seed's words, and a table with a row
    per reply token (the same numbers as summary.json's worked_example)."""
    parts = ["# One PPO step, token by token\n\nThe reply of the step's rollout batch with the largest mean "
             "|advantage|: where the step teaches most. The same numbers are in summary.json under worked_example."]
    for which, ex in sorted(examples.items(), key=lambda kv: kv[1]["step"]):
        parts.append(f"\n## Step {ex['step']} ({which})\n\n**Prompt:** {json.dumps(ex['prompt'], ensure_ascii=False)}"
                     f"\n\n**Reply:** {ex['reply']}\n\n{example_story(ex)}\n")
        cols = [k for k in ("tokens", "logprobs", "ref_logprobs", "kl", "rewards", "values", "deltas",
                            "advantages_raw", "advantages", "returns", "ratio", "clipped") if k in ex]
        parts.append("| t | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 1))
        for t in range(len(ex["tokens"])):
            cells = [repr(ex[k][t]) if k == "tokens" else str(ex[k][t]) if k == "clipped" else f"{ex[k][t]:.4f}"
                     for k in cols]
            parts.append(f"| {t} | " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
        if "group" in ex:
            parts.append("\n| reply of the group | total reward | baseline | advantage |\n|---|---|---|---|")
            parts += [f"| {'**' if g['shown'] else ''}{g['reply'][:60]}{'**' if g['shown'] else ''} | "
                      f"{g['reward']:.3f} | {g['baseline']:.3f} | {g['advantage']:.3f} |" for g in ex["group"]]
    atomic_write(path, lambda f: f.write("\n".join(parts) + "\n"))


def example_story(ex):
    """Two or three sentences in the seed's words: actual score, expected score, advantage, what PPO did."""
    raw, white = ex["advantages_raw"][0], ex["advantages"][0]
    sign = lambda x: "positive" if x > 0 else "negative"  # noqa: E731
    said = f"The reward model scored this reply {ex['score']:.2f} (the actual score)"
    if "values" in ex:
        said += (f"; the critic expected {ex['values'][0]:.2f} before its first token (the expected score), so its "
                 f"advantage, actual minus expected, is {sign(raw)}: A_0 = {raw:.2f}")
    else:
        said += (f"; there is no critic ({ex['advantage']}): its advantage, A_0 = {raw:.2f}, compares it with a "
                 f"baseline from " + ("the other replies to the same prompt" if "group" in ex else "the batch"))
    if (raw > 0) != (white > 0):
        said += (f". Whitened over the batch it is {white:.2f}: the other replies did better against their "
                 f"expectations" if white < 0 else f". Whitened over the batch it is {white:.2f}: the other replies "
                 f"did worse against their expectations")
    moved = "more" if ex["logprob_after"] > ex["logprob_before"] else "less"
    return (f"{said}. PPO made the reply {moved} likely: its log-probability went {ex['logprob_before']:.2f} -> "
            f"{ex['logprob_after']:.2f} over this step's epochs, on a KL leash of β = {ex['beta']:.3f} (each token's "
            f"reward r_t is -β·KL_t, and the score is added on the last token).")


def write_reports(summary, state, metrics_dir, c):
    """summary.json and training_curves.png, each written atomically."""
    if state.rows:
        plot_curves(pd.DataFrame(state.rows), os.path.join(metrics_dir, "training_curves.png"), c["PPO_TARGET"],
                    state.eval_points, "reward-function" if summary["models"].get("reward_is_function") else "RM",
                    entropy_floor(state.rows, c))
    atomic_write(os.path.join(metrics_dir, "summary.json"), lambda f: json.dump(summary, f, indent=1))


# ---- command line: --name=value overrides, --help -------------------------------------------------------------------
def config_comments(script, names):
    """{NAME: comment} read from the config block of `script` (code/ppo.py), so --help is the config block itself."""
    out = {}
    with open(os.path.abspath(script), encoding="utf-8") as f:
        for line in f:
            m = re.match(r"^([A-Z][A-Z0-9_]*) = .*?#\s*(.*)$", line)
            if m and m.group(1) in names:
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


def print_help(config, doc, script):
    print(doc.split("\n\n")[0] + "\n\nSettings (--name=value; the default follows each name):")
    comments = config_comments(script, config)
    for k in config:
        print(f"  --{k.lower():<22} {config[k]!r:<28} {comments.get(k, '')}")


def resolve_config(argv, defaults, doc, script):
    """The run's config: the defaults (the constants of `script`), with argv's --name=value overrides; --help prints
    the settings with their comments (doc: the script's docstring, whose first paragraph heads the list)."""
    config = dict(defaults)
    if any(a in ("-h", "--help") for a in argv):
        try:
            print_help(config, doc, script)
            sys.stdout.flush()
        except BrokenPipeError:  # the reader stopped early (--help | head): end quietly, as command-line tools do;
            # stdout goes to devnull so that the interpreter's last flush at exit does not fail again (Python docs)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    config.update(parse_overrides(argv, config))
    return config


def main(train, argv, defaults, doc, script):
    """train(resolve_config(argv)) with the exit codes: 0 done, 2 bad input, 3 diverged (non-finite numbers),
    130 / 143 stopped by Ctrl-C / SIGTERM."""
    # rank 0 says it; the others wait a moment first, as torchrun stops every process once one has exited with an error
    quiet = lambda msg: time.sleep(2)  # noqa: E731
    say = (lambda msg: print(msg, file=sys.stderr)) if os.environ.get("RANK", "0") == "0" else quiet
    c = defaults
    try:
        c = resolve_config(argv, defaults, doc, script)
        result = train(c)
        return 128 + result["signum"] if result and result.get("status") == "interrupted" and result["signum"] else 0
    except ConfigError as e:
        say(f"error: {e}")
        return 2
    except TrainingDiverged as e:
        say(f"error: {e}")
        return 3
    except KeyboardInterrupt:
        kept = list_checkpoints(os.path.join(c["OUTPUT_DIR"], "checkpoints"))
        say(f"\nstopped at once; the newest checkpoint, {kept[-1]}, resumes the run (RESUME=auto)" if kept else
            "\nstopped at once, before any checkpoint was written: there is nothing to resume")
        return 130
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        say(f"error: no space left on the device ({e.filename or c['OUTPUT_DIR']}); free some space, then run the "
            f"same command again (the newest checkpoint in {c['OUTPUT_DIR']}/checkpoints resumes the run)")
        return 2
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


