"""Long-context tasks, RULER-style, generated from a seed. Each builds a prompt of about ``length`` tokens with
needles at chosen depths and scores a generated answer by exact match.

A task is registered in :data:`TASKS`. ``generate(tokenizer, length, rng, depth)`` returns a :class:`Sample`
(context, question, expected answers); ``score`` is the share of expected answers that appear in
the generated text (1 or 0 for single answers).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import Callable

from ..registry import Registry
from .haystack import fill


@dataclass(frozen=True)
class Sample:
    task: str
    context: str
    question: str
    answers: tuple[str, ...]
    depth: float
    meta: dict = field(default_factory=dict, compare=False)

    def score(self, generated: str) -> float:
        return sum(answer in generated for answer in self.answers) / len(self.answers)


@dataclass(frozen=True)
class Task:
    name: str
    summary: str
    build: Callable[[random.Random], tuple[list[str], str, tuple[str, ...], str]]
    haystack: str = "essay"
    max_new_tokens: int = 16

    def generate(self, tokenizer, length: int, rng: random.Random, depth: float) -> Sample:
        """``length``: target prompt length in tokens; ``depth``: where the needles go (0 start, 1 end)."""
        needles, question, answers, instruction = self.build(rng)
        fixed = " ".join([instruction, *needles, question])
        budget = length - len(tokenizer(fixed, add_special_tokens=False).input_ids) - 32  # chat template
        filler = fill(tokenizer, max(budget, 0), self.haystack, rng)
        # Needles spread around the requested depth, each at a sentence boundary.
        positions = sorted(min(len(filler), int(round(len(filler) * min(1.0, max(0.0, depth + 0.02 * i)))))
                           for i in range(len(needles)))
        text = list(filler)
        for offset, (position, needle) in enumerate(zip(positions, needles)):
            text.insert(position + offset, needle)
        context = instruction + "\n\n" + " ".join(text)
        return Sample(self.name, context, question, answers, depth)


TASKS: Registry[Task] = Registry("task")


def _number(rng: random.Random, digits: int = 6) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(5, 8)))


def _passkey(rng):
    key = _number(rng, 5)
    return ([f"The pass key is {key}. Remember it. {key} is the pass key."],
            "What is the pass key? Answer with the number only.", (key,),
            "There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
            "memorize it. I will quiz you about it.")


def _niah_single(rng):
    key, value = _word(rng), _number(rng)
    return ([f"One of the special magic numbers for {key} is: {value}."],
            f"What is the special magic number for {key} mentioned in the provided text? Answer with the number only.",
            (value,),
            "Some special magic numbers are hidden within the following text. Make sure to memorize them.")


def _niah_question_first(rng):
    """The question comes before the text and the prompt ends generically, so the last rows of the prompt (the
    rows Delta makes exact) hold neither the key nor the question."""
    key, value = _word(rng), _number(rng)
    return ([f"One of the special magic numbers for {key} is: {value}."],
            "What is the special magic number asked about at the beginning? Answer with the number only.", (value,),
            f"Question: what is the special magic number for {key}? It is hidden in the following text. Read the "
            "text, then answer.")


def _niah_multikey(rng):
    keys = [_word(rng) for _ in range(4)]
    values = [_number(rng) for _ in keys]
    target = rng.randrange(len(keys))
    return ([f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)],
            f"What is the special magic number for {keys[target]} mentioned in the provided text? Answer with the "
            "number only.", (values[target],),
            "Some special magic numbers are hidden within the following text. Make sure to memorize them.")


def _niah_multivalue(rng):
    key = _word(rng)
    values = [_number(rng) for _ in range(3)]
    return ([f"One of the special magic numbers for {key} is: {v}." for v in values],
            f"What are all the special magic numbers for {key} mentioned in the provided text? Answer with the "
            "numbers only.", tuple(values),
            "Some special magic numbers are hidden within the following text. Make sure to memorize them.")


def _variable_tracking(rng):
    # Two assignments, one of them indirect: SmolLM2-135M follows one hop (3/4 at 2K) but answers "1" to a
    # three-link chain at any length, which measured nothing.
    value = _number(rng, 5)
    names = [rng.choice(string.ascii_uppercase) + rng.choice(string.ascii_uppercase) + str(rng.randint(1, 9))
             for _ in range(2)]
    return ([f"VAR {names[0]} = {value}.", f"VAR {names[1]} = {names[0]}."],
            f"What is the value of {names[1]}? Answer with the number only.", (value,),
            "Memorize and track the chain of variable assignments hidden in the following text.")


def _aggregation(rng):
    words = [_word(rng) for _ in range(8)]
    frequent = words[0]
    # The frequent word appears 12 times, the others once or twice each, all scattered as needles.
    needles = [f"Remember the word {frequent}." for _ in range(12)]
    needles += [f"Remember the word {w}." for w in words[1:] for _ in range(rng.randint(1, 2))]
    rng.shuffle(needles)
    return (needles, "Which word was asked to be remembered most often in the text above? Answer with the word "
            "only.", (frequent,),
            "Below is a long text in which some words are to be remembered. Count how often each one is.")


for task in (
    Task("passkey", "find a 5-digit pass key", _passkey, haystack="noise"),
    # The model restates the question before the number: the niah answers need up to ~25 tokens.
    Task("niah_single", "one key -> number needle", _niah_single, max_new_tokens=32),
    Task("niah_multikey", "four key -> number needles, one asked", _niah_multikey, max_new_tokens=32),
    Task("niah_question_first", "one needle, asked before the text (not in the prompt's tail)",
         _niah_question_first, max_new_tokens=32),
    Task("niah_multivalue", "one key with three numbers, all asked", _niah_multivalue, max_new_tokens=56),
    Task("variable_tracking", "a value through one indirect assignment", _variable_tracking),
    Task("aggregation", "the most frequently remembered word", _aggregation, max_new_tokens=16),
):
    TASKS.register(task.name, task)
