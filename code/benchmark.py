"""Benchmark code/ppo.py: a few PPO steps with the current constants, then the bare operations alone (the floor).

    python code/benchmark.py                         # the demo: 20 steps, rollout 16, 4 epochs, 48 new tokens
    python code/benchmark.py --steps=30 --mini_batch_size=16 --random_width=256
    python code/benchmark.py --random_width=896 --random_layers=24 --device=cuda --dtype=bfloat16   # ~0.5B-class

Any ppo.py setting can be overridden as --name=value. --random_width=N (and --random_layers, --random_heads) swaps
the demo models for randomly initialised GPT-2 actor and reward model of that size with the demo tokenizer, built in
a temporary folder (random weights rarely emit EOS, so replies run to MAX_NEW_TOKENS: a fixed reply length).

Prints and writes OUTPUT_DIR/benchmark.json (default output/benchmark), beside the run's ppo_metrics/ (the
run itself goes to a temporary folder inside OUTPUT_DIR, deleted after: no checkpoint is left behind, and the
paths in its summary.json name that folder): median step time and its split into generate / score / train,
generated tokens per second, peak memory, and the floor: the sum of the bare operations measured alone on the same
prompts: ppo.rollout's generate phase (sampling, which also gives the old logprobs) and score phase (reference,
critic and reward forwards, rewards, GAE), and ppo.ppo_update (the PPO forward/backward/optimizer passes), called
without the loop around them. overhead = step time / floor.
"""
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loading  # noqa: E402
import plumbing  # noqa: E402
import ppo  # noqa: E402


def build_random_models(folder, width, layers, heads):
    """Random GPT-2 actor (causal LM) and reward model (sequence classification) with the demo tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel
    tok = AutoTokenizer.from_pretrained(ppo.ACTOR_MODEL)
    cfg = dict(vocab_size=len(tok), n_positions=1024, n_embd=width, n_layer=layers, n_head=heads,
               activation_function="gelu_new", pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
               bos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    for name, cls, extra in (("actor", GPT2LMHeadModel, {}), ("rm", GPT2ForSequenceClassification, {"num_labels": 1})):
        cls(GPT2Config(**cfg, **extra)).save_pretrained(os.path.join(folder, name))
        tok.save_pretrained(os.path.join(folder, name))
    return os.path.join(folder, "actor"), os.path.join(folder, "rm")


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def measure_floor(c, batches, device, dtype):
    """The PPO step's own functions called directly on the same prompts, without the loop around them (metrics,
    gold score, CSV, checkpoints): ppo.rollout (its generate and score phases) and ppo.ppo_update. Median seconds
    per step of each phase."""
    torch.manual_seed(c["SEED"])
    roles = loading.load_roles(c, device, dtype)
    params = loading.trainable_parameters(roles.trained().values())
    optimizer = torch.optim.AdamW(params, lr=c["LEARNING_RATE"], eps=c["ADAM_EPS"],
                                  fused=device.type in ("cpu", "cuda"))
    trainer = ppo.Trainer(roles.actor, roles.critic, params, optimizer, None)
    parts = {"sample": [], "score": [], "train": []}
    for prompts in batches:
        with ppo.autocast(device, dtype):
            batch = ppo.rollout(roles, prompts, c["INIT_KL_COEF"], c)
        parts["sample"].append(batch["time_generate"])
        parts["score"].append(batch["time_score"])

        def train():
            with ppo.autocast(device, dtype, weights_change=True):
                ppo.ppo_update(trainer, batch, c)
        parts["train"].append(timed(train, device)[0])
    return {k: statistics.median(v) for k, v in parts.items()}


def main(argv):
    own = {"steps": 20, "random_width": 0, "random_layers": 4, "random_heads": 4}
    rest = []
    for a in argv:
        key = a[2:].split("=", 1)[0] if a.startswith("--") and "=" in a else None
        if key in own:
            own[key] = int(a.split("=", 1)[1])
        else:
            rest.append(a)
    c = plumbing.resolve_config(rest, ppo.DEFAULTS, ppo.__doc__, ppo.__file__)
    c.update(TOTAL_STEPS=own["steps"], EVAL_FILE="", SAVE_MODEL=False, SAVE_EVERY=0, RESUME="never",
             SAMPLE_EVERY=0, GOLD_REWARD=c["GOLD_REWARD"] if not own["random_width"] else "")
    if c["OUTPUT_DIR"] == ppo.OUTPUT_DIR:
        c["OUTPUT_DIR"] = os.path.join(ppo.OUTPUT_DIR, "benchmark")
    tmp = tempfile.TemporaryDirectory()
    if own["random_width"]:
        c["ACTOR_MODEL"], c["REWARD_MODEL"] = build_random_models(tmp.name, own["random_width"], own["random_layers"],
                                                                  own["random_heads"])
    out = c["OUTPUT_DIR"]
    plumbing.check_writable(out, os.path.join(out, "ppo_metrics"), 0)
    # the run in a folder of its own inside OUTPUT_DIR, deleted after: its final checkpoint is 3.2 GB on SmolLM2
    run = tempfile.TemporaryDirectory(dir=out)
    c["OUTPUT_DIR"] = run.name
    summary = ppo.train(c)
    shutil.copytree(os.path.join(run.name, "ppo_metrics"), os.path.join(out, "ppo_metrics"), dirs_exist_ok=True)
    run.cleanup()
    rss_mb = summary["memory_mb"]["peak"]  # the run's peak, before the floor's models
    import pandas as pd
    df = pd.read_csv(os.path.join(out, "ppo_metrics", "training_metrics.csv"))
    df = df.iloc[min(2, len(df) - 1):]  # leave out warm-up steps
    device = plumbing.pick_device(c["DEVICE"])
    dtype = plumbing.pick_dtype(c["DTYPE"], device)
    # the same prompts as the measured steps: replay the run's prompt order
    tok, _ = loading.load_tokenizer(c["ACTOR_MODEL"], "ACTOR_MODEL")
    prompts = loading.load_prompts(c["PROMPT_FILE"], tok, c["MAX_PROMPT_TOKENS"], "PROMPT_FILE", lambda *a: None)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(c["SEED"])).tolist()
    n = summary["derived"]["ROLLOUT_BATCH"]
    batches = [[prompts[i] for i in order[k * n:(k + 1) * n]] for k in range(min(5, own["steps"], len(order) // n))]
    floor = measure_floor(c, batches, device, dtype)
    step = float(df["time/step_s"].median())
    floor_s = sum(floor.values())
    result = {
        "steps": int(summary["steps"]), "rollout_batch": n, "max_new_tokens": c["MAX_NEW_TOKENS"],
        "ppo_epochs": c["PPO_EPOCHS"], "mini_batch_size": c["MINI_BATCH_SIZE"], "device": str(device),
        "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "actor_params": summary["models"]["actor_params"],
        "step_time_s_median": round(step, 4),
        "phases_s_median": {k: round(float(df[f"time/{k}_s"].median()), 4) for k in ("generate", "score", "train")},
        "resp_len_mean": round(float(df["resp/length_mean"].mean()), 2),
        "tokens_per_s": round(float((df["resp/length_mean"] * n).sum() / df["time/step_s"].sum()), 1),
        "peak_rss_mb": round(rss_mb, 1), "memory_mb": summary["memory_mb"],
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None,
        "floor_s": {k: round(v, 4) for k, v in floor.items()}, "floor_total_s": round(floor_s, 4),
        "overhead": round(step / floor_s, 3),
        "versions": summary["versions"],
    }
    with open(os.path.join(out, "benchmark.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except loading.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
