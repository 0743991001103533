"""Synthetic inputs of the benchmarks: seeded sentences and seeded weight noise.

The tests' fixtures draw on them too (tests may import benchmarks; nothing in
``benchmarks`` imports the tests).
"""

from __future__ import annotations

import copy
import random
from typing import Any

import torch

# Phrase lists, '|'-separated to keep them compact.
_SUBJECTS = tuple(
    (
        "the farmer|a small child|the old teacher|my neighbour|the captain|"
        "a quiet student|the baker|her brother|the doctor|a tired painter|"
        "the river|the city council|a young fox|the wind|our team"
    ).split("|")
)

_VERBS = tuple(
    (
        "carried|found|painted|watched|borrowed|repaired|followed|opened|"
        "described|planted|counted|remembered|sold|cleaned"
    ).split("|")
)

_OBJECTS = tuple(
    (
        "a wooden box|the green door|three apples|an old map|the long road|"
        "a broken clock|the morning bread|a letter|the red kite|two stones|"
        "the garden gate|a heavy coat|the last train|a bright lamp"
    ).split("|")
)

_PLACES = tuple(
    (
        "near the market|by the sea|in the forest|after the storm|"
        "before dinner|under the bridge|at the station|on a cold morning|"
        "during the festival|behind the school|across the valley"
    ).split("|")
)

_ENDINGS = tuple(
    (
        "and smiled|without a word|for the first time|because it was late|"
        "while the bells rang|and then went home|with great care|again"
    ).split("|")
)


def generate_sentences(count: int, seed: int = 0) -> list[str]:
    """``count`` short English-like sentences, the same for the same seed.

    Built from fixed word lists; every sentence has a subject, verb, object and
    a place, and some have an ending, so a tokenizer trained on them sees
    recurring words and a few hundred of them give thousands of tokens.
    """
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        words = [
            rng.choice(_SUBJECTS),
            rng.choice(_VERBS),
            rng.choice(_OBJECTS),
            rng.choice(_PLACES),
        ]
        if rng.random() < 0.5:
            words.append(rng.choice(_ENDINGS))
        sentence = " ".join(words)
        sentences.append(sentence[0].upper() + sentence[1:] + ".")
    return sentences


def finetune_variant(model: Any, *, seed: int, scale: float) -> Any:
    """A copy of ``model`` with every parameter perturbed by seeded noise.

    Each parameter moves by ``scale · max(rms(p), 0.02) · N(0, 1)``: relative to
    its own size, with a floor so zero-initialised biases move too. Tied
    parameters are perturbed once and stay tied. A stand-in for fine-tuning
    where only distinct, reproducible weights matter.
    """
    variant = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in variant.parameters():
            magnitude = max(param.detach().float().pow(2).mean().sqrt().item(), 0.02)
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            param.add_((scale * magnitude * noise).to(param.dtype))
    return variant
