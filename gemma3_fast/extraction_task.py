"""A fine-tuning task made here, offline: pull a person's name, age, city and job out of one sentence, as JSON.

    python -m gemma3_fast.extraction_task --out data/extract    # train.jsonl (2000), val.jsonl and test.jsonl (200)

Each line is a chat example, {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}, whose answer is
one JSON object: {"name": "Korabal Tisley", "age": 34, "city": "Velograd", "job": "nurse"}. The sentences come from
16 templates that put the fields in different orders and words. Names and cities are made up from
syllables, and validation (for training's early stopping) and test (for the accuracy) use none that training
does, so a model that passes them copies those fields from the sentence rather than recalling them; the job is
one of 40 common words.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

# Names and cities are made up from syllables, so a model cannot know them beforehand and must copy them from the
# sentence; validation and test use none that training does. Jobs are a closed list of common words.
SYLLABLES = ("ka lo mi ra to ne si da vo ri an el os ul be ta fe gu zo ni la ve mo sa ko "
             "dre bal mun tis gor pel wen har cor lin").split()
SURNAME_ENDS = ("son", "ova", "ez", "ini", "berg", "ley", "ard", "sky", "ford", "", "", "")
CITY_ENDS = ("ton", "burg", "ville", "port", "field", "stad", "grad", "mouth", "haven", "dale", "a", "o")
JOBS = ("nurse;teacher;carpenter;pilot;chef;lawyer;plumber;architect;dentist;baker;journalist;electrician;"
        "librarian;pharmacist;photographer;firefighter;engineer;accountant;gardener;tailor;veterinarian;"
        "translator;mechanic;farmer;designer;physicist;barber;sculptor;paramedic;florist;economist;locksmith;"
        "surveyor;jeweler;welder;geologist;midwife;potter;chemist;butcher").split(";")
TEMPLATES = (
    "{name}, {age}, works as a {job} in {city}.",
    "Meet {name}: a {age}-year-old {job} from {city}.",
    "{city} is home to {name}, who is {age} and makes a living as a {job}.",
    "At {age}, {name} moved to {city} to start a new life as a {job}.",
    "Our new {job}, {name}, is {age} years old and lives in {city}.",
    "{name} ({age}) has been a {job} in {city} for years.",
    "The {job} we met in {city} was {name}, aged {age}.",
    "Born {age} years ago, {name} now works in {city} as a {job}.",
    "In {city}, {age}-year-old {name} runs a small business as a {job}.",
    "{name} is a {job} who is {age} and lives in {city}.",
    "Ask anyone in {city} about the {job} {name}; at {age}, everyone knows the name.",
    "Having turned {age} last spring, {name} still works as a {job} near {city}.",
    "{name}, a {job} by trade, celebrated turning {age} in {city}.",
    "Profile: {name}. Age: {age}. Based in {city}. Occupation: {job}.",
    "Everyone at the {city} office calls {name} the best {job} they have; {name} is {age}.",
    "After years abroad, {name} ({age}) settled in {city} and found work as a {job}.",
)
INSTRUCTION = ("Extract the person's name, age, city and job from the sentence. Answer with a JSON object with "
               "the keys name, age, city and job.\n\nSentence: ")


def made_up(rng: random.Random, syllables: int, end: str = "") -> str:
    return ("".join(rng.choice(SYLLABLES) for _ in range(syllables)) + end).capitalize()


def make_example(rng: random.Random, avoid: set[str]) -> tuple[dict, tuple[str, str]]:
    while True:
        name = f"{made_up(rng, rng.randint(2, 3))} {made_up(rng, rng.randint(1, 2), rng.choice(SURNAME_ENDS))}"
        city = made_up(rng, rng.randint(1, 2), rng.choice(CITY_ENDS))
        if name not in avoid and city not in avoid:
            break
    fields = {"name": name, "age": rng.randint(19, 79), "city": city, "job": rng.choice(JOBS)}
    sentence = rng.choice(TEMPLATES).format(**fields)
    return {"messages": [{"role": "user", "content": INSTRUCTION + sentence},
                         {"role": "assistant", "content": json.dumps(fields)}]}, (name, city)


def make_splits(n_train: int, n_held_out: int, seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, test): validation and test use no name or city that training does."""
    rng = random.Random(seed)
    train, seen = [], set()
    for _ in range(n_train):
        example, used = make_example(rng, set())
        train.append(example)
        seen.update(used)
    held = [make_example(rng, seen)[0] for _ in range(2 * n_held_out)]
    return train, held[:n_held_out], held[n_held_out:]


def write_jsonl(rows: list[dict], path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gemma3_fast.extraction_task", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for train.jsonl and val.jsonl")
    p.add_argument("--train", type=int, default=2000, help="training examples")
    p.add_argument("--val", type=int, default=200, help="validation and test examples each (held-out names, cities, "
                                                        "jobs)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.train < 1 or a.val < 1:
        print("gemma3_fast.extraction_task: error: --train and --val must be >= 1", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    train, val, test = make_splits(a.train, a.val, a.seed)
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(val, out / "val.jsonl")
    write_jsonl(test, out / "test.jsonl")
    print(f"wrote {a.train} examples to {out / 'train.jsonl'}, {a.val} each to {out / 'val.jsonl'} and "
          f"{out / 'test.jsonl'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
