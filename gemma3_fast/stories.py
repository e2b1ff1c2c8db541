"""`python -m gemma3_fast.stories --out stories.txt`: a synthetic corpus of short children's stories, made here
from templates (no download), for from-scratch training runs and their tests.

TinyStories-like in spirit, not in size: a few hundred names, places, objects and feelings combined by a
small grammar into stories of 4-8 sentences with a beginning, a problem and an ending. Deterministic for a seed.
A model trained on it should learn the grammar, the story shape and which words go together (a bird flies,
a ball rolls), which a reader can judge from its samples.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

NAMES = ["Lily", "Tom", "Mia", "Ben", "Sara", "Max", "Anna", "Leo", "Zoe", "Sam", "Emma", "Jack", "Lucy", "Finn",
         "Ella", "Noah", "Ruby", "Owen", "Ivy", "Theo"]
ANIMALS = [("cat", "purred"), ("dog", "barked"), ("bird", "sang"), ("frog", "jumped"), ("duck", "quacked"),
           ("bunny", "hopped"), ("fox", "ran"), ("owl", "hooted"), ("bear", "growled"), ("fish", "swam")]
PLACES = ["the park", "the garden", "the forest", "the beach", "the farm", "the big hill", "the river",
          "the old house", "the school", "the market"]
OBJECTS = [("ball", "red"), ("kite", "blue"), ("box", "small"), ("hat", "yellow"), ("boat", "little"),
           ("book", "green"), ("cake", "sweet"), ("shell", "shiny"), ("flower", "pink"), ("drum", "loud")]
FEELINGS = ["happy", "sad", "scared", "excited", "tired", "curious", "proud", "brave"]
WEATHER = ["It was a sunny day.", "The wind was cold.", "It was raining a little.", "The sky was bright and blue.",
           "It was a warm morning.", "Snow covered the ground."]
PROBLEMS = [
    "{name} lost the {obj} near {place}.",
    "The {obj} fell into the water.",
    "A big {animal} took the {obj} and ran away.",
    "The {obj} broke into two pieces.",
    "{name} could not find the way home from {place}.",
]
HELP = [
    "{friend} came to help.",
    "A kind {animal} showed {name} where to look.",
    "{name} asked mom for help.",
    "{friend} had a good idea.",
]
ENDINGS = [
    "In the end, {name} found the {obj} under a tree and smiled.",
    "They fixed the {obj} together, and {name} felt {feeling} again.",
    "{name} and {friend} went home and had some warm milk.",
    "From that day on, {name} always kept the {obj} close.",
    "{name} learned that friends make everything better.",
]


def story(rng: random.Random) -> str:
    name, friend = rng.sample(NAMES, 2)
    animal, sound = rng.choice(ANIMALS)
    obj, adj = rng.choice(OBJECTS)
    place = rng.choice(PLACES)
    feeling = rng.choice(FEELINGS)
    fill = dict(name=name, friend=friend, animal=animal, obj=obj, place=place, feeling=feeling)
    lines = [f"Once upon a time, there was a {rng.choice(FEELINGS)} child named {name}.",
             f"{name} had a {adj} {obj}.", rng.choice(WEATHER),
             f"{name} and {friend} went to {place} to play with the {obj}."]
    if rng.random() < 0.6:
        lines.append(f"At {place}, a {animal} {sound}. {name} laughed.")
    lines.append(rng.choice(PROBLEMS).format(**fill))
    lines.append(f"{name} felt {rng.choice(['sad', 'scared', 'worried'])}.")
    lines.append(rng.choice(HELP).format(**fill))
    lines.append(rng.choice(ENDINGS).format(**fill))
    return " ".join(lines)


def write_corpus(path: str | Path, count: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text("\n\n".join(story(rng) for _ in range(count)) + "\n")
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gemma3_fast.stories", description=__doc__)
    p.add_argument("--out", required=True, help="the .txt file to write")
    p.add_argument("--count", type=int, default=20000, help="number of stories")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.count < 1:
        p.error(f"--count must be >= 1, got {a.count}")
    out = write_corpus(a.out, a.count, a.seed)
    print(f"wrote {a.count} stories ({out.stat().st_size / 1e6:.1f} MB) to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
