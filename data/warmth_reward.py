"""The reward of the chat task "make the assistant's replies warmer": VADER's sentiment of the reply.

    score(prompts: list[str], responses: list[str]) -> list[float]      (REWARD_MODEL = this file)

VADER (Hutto & Gilbert, ICWSM 2014; `pip install vaderSentiment`) is a published lexicon-and-rules sentiment scorer
that nobody in this project wrote: ~7,500 words rated by people, plus rules for negation, "but", intensifiers,
capitals, "!" and emoticons. Its `compound` score is in [-1, 1]; a plain factual reply scores about 0. Only the reply
is scored, never the prompt. Being rules, it can be gamed: "!", capitals and a pile of warm words raise it whatever
the reply says; the gold judge (data/warmth_gold.py) is a different scorer, to show when that happens.
"""
try:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
except ImportError:
    raise ImportError("the package vaderSentiment is not installed: pip install vaderSentiment") from None

_VADER = SentimentIntensityAnalyzer()


def score(prompts, responses):
    return [_VADER.polarity_scores(r)["compound"] for r in responses]
