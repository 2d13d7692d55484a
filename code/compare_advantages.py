"""What the Critic buys: GAE (four roles) against the critic-free estimators (GRPO, RLOO, REINFORCE++) on the demo,
at the same wall-clock budget of training (not the same number of steps), over several seeds.

    python code/compare_advantages.py                           # 90 s of training per run, seeds 0 1 2 (~25 min)
    python code/compare_advantages.py --budget_s=30 --seeds=0   # a quick look
    python code/compare_advantages.py --set=beyond              # GRPO vs GRPO + DAPO's set, GAE vs GAE + warm-up

First a short pilot run of each estimator (PILOT_STEPS steps; keep the machine quiet for these) measures the median
step time and the peak memory; the budget then sets TOTAL_STEPS = budget / step time, and each seed trains that many
steps in a process of its own (evaluated on the held-out prompts before and after, EVAL_EVERY=0). Step counts come
from the pilot, so the learning numbers do not depend on what else runs on the machine later. Any ppo.py setting can
be overridden as --name=value (applied to every run). Writes OUTPUT_DIR/compare_SET/ (each run's outputs and
compare_SET.json; SET is --set, advantages by default; OUTPUT_DIR defaults to output) and prints a Markdown table.
"""
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import ppo  # noqa: E402

PILOT_STEPS = 30
# the same rollout batch of 16 replies for every estimator; the group estimators sample 4 replies for each of 4 prompts
GRPO = ["--advantage=grpo", "--samples_per_prompt=4"]
DAPO = ["--clip_range_high=0.28", "--overlong_buffer=12", "--overlong_penalty=1.0",
        "--loss_agg=seq-mean-token-sum-norm"]
SETS = {
    "advantages": {
        "gae": [],
        "grpo": GRPO,
        "rloo": ["--advantage=rloo", "--samples_per_prompt=4"],
        "reinforce++": ["--advantage=reinforce++"],
    },
    # beyond the seed: DAPO's clip-higher, overlong shaping and token-sum loss, then with its dynamic sampling too,
    # and a critic warm-up before the actor moves
    "beyond": {
        "grpo": GRPO,
        "grpo+dapo": GRPO + DAPO,
        "grpo+dapo+dynamic": GRPO + DAPO + ["--dynamic_sampling=true", "--max_extra_rollouts=3"],
        "gae": [],
        "gae+warmup": ["--critic_warmup_steps=10"],
    },
}


def run(args, out):
    """code/ppo.py in a process of its own (its peak memory is its own); returns its summary.json."""
    r = subprocess.run([sys.executable, os.path.join(HERE, "ppo.py"), f"--output_dir={out}", "--resume=never",
                        "--save_model=false", "--save_every=0", "--eval_every=0", "--sample_every=0"] + args,
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"error: {' '.join(args)} failed:\n{r.stderr[-2000:]}")
    return json.load(open(os.path.join(out, "ppo_metrics", "summary.json")))


def main(argv):
    own = {"budget_s": 90.0, "seeds": "0,1,2", "output_dir": ppo.OUTPUT_DIR, "set": "advantages"}
    rest = []
    for a in argv:
        key = a[2:].split("=", 1)[0] if a.startswith("--") and "=" in a else None
        if key in own:
            own[key] = type(own[key])(a.split("=", 1)[1])
        else:
            rest.append(a)
    seeds = [int(s) for s in own["seeds"].split(",")]
    root = os.path.join(own["output_dir"], f"compare_{own['set']}")
    variants = SETS[own["set"]]
    results = {}
    import pandas as pd
    for name, extra in variants.items():  # all pilots first: their step times want a quiet machine
        pilot = run(extra + rest + [f"--total_steps={PILOT_STEPS}", "--eval_file="], os.path.join(root, name, "pilot"))
        df = pd.read_csv(os.path.join(root, name, "pilot", "ppo_metrics", "training_metrics.csv")).iloc[2:]
        step_s = float(df["time/step_s"].median())
        results[name] = {"step_s": round(step_s, 4), "steps": max(1, round(own["budget_s"] / step_s)),
                         "peak_rss_mb": pilot["memory_mb"]["peak"],
                         "roles": pilot["models"]["roles_loaded"], "runs": []}
        print(name, "pilot:", results[name], flush=True)
    for name, extra in variants.items():
        for seed in seeds:
            s = run(extra + rest + [f"--total_steps={results[name]['steps']}", f"--seed={seed}"],
                    os.path.join(root, name, f"seed{seed}"))
            b, a = s["eval_before"], s["eval_after"]
            results[name]["runs"].append({"seed": seed, "gold_gain": a["gold_score"] - b["gold_score"],
                                          "rm_gain": a["rm_score"] - b["rm_score"], "kl": a["kl"],
                                          "gold_after": a["gold_score"]})
            print(name, results[name]["runs"][-1], flush=True)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f"compare_{own['set']}.json"), "w") as f:
        json.dump({"budget_s": own["budget_s"], "seeds": seeds, "overrides": rest, "results": results}, f, indent=1)

    def mean_sd(key, runs):
        xs = [r[key] for r in runs]
        return f"{statistics.mean(xs):+.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:+.2f}"
    print(f"\n{own['budget_s']:g} s of training per run, seeds {own['seeds']} (mean ± sd)\n")
    print("| advantage | roles | step | steps | held-out gold gain | RM gain | final KL | peak memory |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {len(r['roles'])} | {r['step_s']:.2f} s | {r['steps']} | "
              f"{mean_sd('gold_gain', r['runs'])} | "
              f"{mean_sd('rm_gain', r['runs'])} | {mean_sd('kl', r['runs'])[1:]} | {r['peak_rss_mb']:.0f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
