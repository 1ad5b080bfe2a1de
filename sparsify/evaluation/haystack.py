"""Filler text for long-context tasks, generated from a seed (nothing ships or downloads).

Two kinds: RULER's classic repeated "noise" sentences, and "essay" sentences assembled from a small vocabulary,
which vary enough that a needle is not trivially the only odd sentence.
"""

from __future__ import annotations

import random

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

_SUBJECTS = ["The old farmer", "A young engineer", "The village council", "Every traveller", "The river",
             "A quiet student", "The baker", "The committee", "Our neighbour", "The mountain guide"]
_VERBS = ["noticed", "remembered", "described", "questioned", "admired", "repaired", "measured", "ignored",
          "followed", "painted"]
_OBJECTS = ["the narrow bridge", "a forgotten letter", "the morning market", "the broken clock",
            "a field of barley", "the harbour lights", "an unusual recipe", "the winter road",
            "the school garden", "a distant bell"]
_ENDINGS = ["before sunrise.", "after the storm.", "with great care.", "for the first time.", "without a word.",
            "near the old mill.", "during the festival.", "in the afternoon.", "as the bells rang.",
            "once again."]


def sentences(kind: str, rng: random.Random):
    """An endless stream of filler sentences."""
    if kind == "noise":
        while True:
            yield NOISE
    elif kind == "essay":
        while True:
            yield f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}"
    else:
        raise ValueError(f"haystack: {kind!r} is not allowed; allowed: noise, essay")


def fill(tokenizer, budget_tokens: int, kind: str, rng: random.Random) -> list[str]:
    """Filler sentences whose total token count stays within ``budget_tokens`` (counted once per sentence)."""
    chosen, used, cache = [], 0, {}
    for sentence in sentences(kind, rng):
        if sentence not in cache:
            cache[sentence] = len(tokenizer(" " + sentence, add_special_tokens=False).input_ids)
        if used + cache[sentence] > budget_tokens:
            return chosen
        chosen.append(sentence)
        used += cache[sentence]
