"""The demo world's hidden gold rule: what a *good* reply to a review/recommendation prompt is.

    score(prompts: list[str], responses: list[str]) -> list[float]

Plain Python, no torch. It labels the reward model's preference pairs (code/build_demo.py) and evaluates PPO
runs (code/ppo.py, GOLD_REWARD); the policy is never trained on it. `prompts` are the prompt texts the policy saw
(chat markup included is fine), `responses` the decoded replies up to the first EOS.

A reply earns (best achievable: +3.5)
    +1    it names the product the prompt asks about           -1 if it does not, -1 more per other product named
    +0.5  per positive word, at most 4 of them                 -0.75 per negative word
    +0.5  it ends like a sentence ('.' or '!')                 -1 if it stops mid-sentence (cut off)
    -1    per repetition: a word said twice in a row, or a three-word phrase said again
    -2    in all, whatever else, for a non-answer of fewer than 4 words (empty replies included)
    -0.05 per word beyond 40 (rambling)
"""
import re

ITEMS = [
    "headphones", "coffee maker", "backpack", "novel", "movie", "tent", "bicycle", "blender", "keyboard", "lamp",
    "jacket", "camera", "notebook", "teapot", "speaker", "umbrella", "sofa", "watch", "board game", "water bottle",
    "hiking boots", "desk chair", "phone case", "toaster", "guitar", "scarf", "pillow", "kettle", "printer", "mouse",
]
POSITIVE = {"great", "excellent", "comfortable", "reliable", "sturdy", "lovely", "useful", "beautiful", "solid",
            "wonderful", "love", "like", "recommend", "perfect", "well", "happy", "nicely", "fantastic"}
NEGATIVE = {"flimsy", "noisy", "awkward", "disappointing", "cheap", "fragile", "dull", "bad", "poor", "not",
            "stopped", "broke", "annoying", "never", "worst", "returned"}
_ITEMS_LONGEST_FIRST = sorted(ITEMS, key=len, reverse=True)


def find_items(text):
    """Products named in `text`, longest names first so that 'hiking boots' is not also read as 'boots'."""
    text, found = " " + re.sub(r"[^a-z ]+", " ", text.lower()) + " ", []
    for item in _ITEMS_LONGEST_FIRST:
        if f" {item} " in text:
            found.append(item)
            text = text.replace(f" {item} ", " ")
    return found


def repetitions(words):
    """Words said twice in a row plus three-word phrases said again ('great great', 'it is great ... it is great')."""
    doubled = sum(a == b for a, b in zip(words, words[1:]))
    trigrams = list(zip(words, words[1:], words[2:]))
    return doubled + len(trigrams) - len(set(trigrams))


def score_one(prompt, response):
    words = re.findall(r"[a-z']+", response.lower())
    if len(words) < 4:
        return -2.0
    asked = find_items(prompt)
    named = find_items(response)
    target = asked[0] if asked else None
    s = 1.0 if target in named else -1.0
    s -= 1.0 * len([n for n in named if n != target])
    s += 0.5 * min(4, sum(w in POSITIVE for w in words)) - 0.75 * sum(w in NEGATIVE for w in words)
    s += 0.5 if response.rstrip().endswith((".", "!")) else -1.0
    s -= 1.0 * repetitions(words)
    s -= 0.05 * max(0, len(words) - 40)
    return float(s)


def score(prompts, responses):
    if len(prompts) != len(responses):
        raise ValueError(f"score() got {len(prompts)} prompts but {len(responses)} responses")
    return [score_one(p, r) for p, r in zip(prompts, responses)]
