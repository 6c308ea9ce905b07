"""Generate the quickstart data set: video-game sentences → meaning representation.

A small synthetic structured-extraction task in the spirit of ViGGO. Each row is Alpaca
format, for example:

    {"instruction": "Extract the attributes.",
     "input": "Shadow Realm is an action and puzzle game, released in 2014.",
     "output": "inform(name[Shadow Realm], release_year[2014], genres[action, puzzle])"}

Contract:
- deterministic: the same --seed and sizes give byte-identical files;
- every value in an output appears verbatim in its input sentence (the model copies, never guesses);
- attributes appear in the output in FIELD_ORDER, genres in GENRES order;
- val names are word combinations never used in train, so a model must copy names, not recall them;
- inputs are at most MAX_INPUT_CHARS and outputs at most MAX_OUTPUT_CHARS characters, because the
  quickstart model is byte-level on CPU: every character is a token.

Usage: python scripts/make_quickstart_data.py [--seed 0] [--n-train 1000] [--n-val 100] [--out data/quickstart]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

INSTRUCTION = "Extract the attributes."
MAX_INPUT_CHARS = 110
MAX_OUTPUT_CHARS = 90
FIELD_ORDER = ("name", "release_year", "developer", "genres", "platforms")
YEARS = range(1985, 2025)
# Share of rows with one optional attribute, developer or platform (never both: with both,
# few outputs fit in MAX_OUTPUT_CHARS). Often enough to learn them, rare enough to stay short.
P_DEVELOPER = 0.25
P_PLATFORM = 0.25
# Share of (first word, second word) pairs held out for val names.
VAL_PAIR_FRACTION = 0.2

# Word lists are compact by hand; one word per line would hide the rest of the file.
# fmt: off
FIRST_WORDS = (
    "Shadow", "Crystal", "Iron", "Neon", "Silent", "Crimson", "Star", "Frost", "Ember", "Hollow",
    "Lunar", "Thunder", "Velvet", "Broken", "Golden", "Wild", "Echo", "Sky", "Storm", "Rogue",
    "Pixel", "Quantum", "Ancient", "Emerald", "Obsidian", "Solar", "Phantom", "Arcane", "Cyber", "Midnight",
)
SECOND_WORDS = (
    "Realm", "Knight", "Odyssey", "Frontier", "Legacy", "Drift", "Saga", "Harbor", "Citadel", "Protocol",
    "Horizon", "Tactics", "Rift", "Runner", "Kingdom", "Quest", "Garden", "Forge", "Voyage", "Arena",
    "Chronicles", "Empire", "Labyrinth", "Outpost", "Signal", "Circuit", "Tempest", "Sanctum", "Hunter", "Crown",
)
SUFFIXES = ("", "", "", "", " II", " III", " Zero", " Reborn")  # "" repeated: most names have none
GENRES = (
    "action", "adventure", "puzzle", "platformer", "role-playing", "strategy",
    "simulation", "shooter", "racing", "fighting", "sports", "rhythm",
)
PLATFORMS = ("PC", "PlayStation", "Xbox", "Switch", "Mac", "Linux")
# Short on purpose (≤ 10 characters): an output with a developer must still fit MAX_OUTPUT_CHARS.
DEVELOPERS = (
    "Bluefern", "Ironclad", "Nova Works", "Pinecone", "Redshift", "Tidewater",
    "Lumen", "Kestrel", "Hexbyte", "Orbit Nine", "Driftwood", "Copperleaf",
)
# fmt: on
DEVELOPER_PHRASES = (" by {}", " from {}", " developed by {}")
PLATFORM_PHRASES = (" on {}", " for {}")

# {a_genres} is "an action and puzzle"; {dev} and {plat} are "" or a phrase like " by Hexbyte".
# No template starts with a genre, so values keep their case when they appear in the sentence.
TEMPLATES = (
    "{name} is {a_genres} game{dev}, released in {year}{plat}.",
    "Released in {year}{plat}, {name} is {a_genres} game{dev}.",
    "{name} came out in {year}{plat}. It is {a_genres} game{dev}.",
    "Have you played {name}? It's {a_genres} game from {year}{dev}{plat}.",
    "{name}{dev} is {a_genres} title that launched in {year}{plat}.",
    "If you like {genres} games, try {name}{dev}, out since {year}{plat}.",
    "{name} ({year}) is {a_genres} game{dev}{plat}.",
    "I remember {name}, {a_genres} game{dev} from {year}{plat}.",
    "Back in {year}, {name} offered {genres} gameplay{dev}{plat}.",
    "{name} is a {year} {genres} game{dev}{plat}.",
    "Fans of {genres} games got {name}{dev} in {year}{plat}.",
    "Looking for {a_genres} game? {name}{dev} arrived in {year}{plat}.",
)


def split_name_pairs(rng: random.Random) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train pairs, val pairs): all word pairs, shuffled, VAL_PAIR_FRACTION of them held out for val."""
    pairs = [(a, b) for a in FIRST_WORDS for b in SECOND_WORDS]
    rng.shuffle(pairs)
    n_val = int(len(pairs) * VAL_PAIR_FRACTION)
    return pairs[n_val:], pairs[:n_val]


def join_genres(genres: list[str]) -> str:
    """English list: "a", "a and b", "a, b and c"."""
    return genres[0] if len(genres) == 1 else ", ".join(genres[:-1]) + " and " + genres[-1]


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def draw_attributes(rng: random.Random, pairs: list[tuple[str, str]]) -> dict[str, object]:
    """One game's attributes: name, year, 1–3 distinct genres in GENRES order, at most one optional field.

    With an optional field there is one genre, so the output usually fits MAX_OUTPUT_CHARS on the
    first draw (redraws would otherwise keep only the rows with extras that have short names).
    """
    first, second = rng.choice(pairs)
    roll = rng.random()
    extra = "developer" if roll < P_DEVELOPER else "platforms" if roll < P_DEVELOPER + P_PLATFORM else None
    n_genres = 1 if extra else rng.randint(1, 3)
    attributes: dict[str, object] = {
        "name": f"{first} {second}{rng.choice(SUFFIXES)}",
        "release_year": rng.choice(YEARS),
        "genres": sorted(rng.sample(GENRES, n_genres), key=GENRES.index),
    }
    if extra == "developer":
        attributes["developer"] = rng.choice(DEVELOPERS)
    elif extra == "platforms":
        attributes["platforms"] = rng.choice(PLATFORMS)
    return attributes


def render_output(attributes: dict[str, object]) -> str:
    """The meaning representation, fields in FIELD_ORDER: inform(name[...], genres[a, b], ...)."""
    fields = []
    for key in FIELD_ORDER:
        if key in attributes:
            value = attributes[key]
            text = ", ".join(value) if isinstance(value, list) else str(value)
            fields.append(f"{key}[{text}]")
    return f"inform({', '.join(fields)})"


def render_sentence(rng: random.Random, attributes: dict[str, object]) -> str:
    genres = join_genres(attributes["genres"])  # type: ignore[arg-type]
    dev = rng.choice(DEVELOPER_PHRASES).format(attributes["developer"]) if "developer" in attributes else ""
    plat = rng.choice(PLATFORM_PHRASES).format(attributes["platforms"]) if "platforms" in attributes else ""
    return rng.choice(TEMPLATES).format(
        name=attributes["name"],
        year=attributes["release_year"],
        genres=genres,
        a_genres=with_article(genres),
        dev=dev,
        plat=plat,
    )


def make_row(rng: random.Random, pairs: list[tuple[str, str]]) -> dict[str, str]:
    """One Alpaca row within the length limits; draws again until one fits (a few tries at most)."""
    while True:
        attributes = draw_attributes(rng, pairs)
        sentence, output = render_sentence(rng, attributes), render_output(attributes)
        if len(sentence) <= MAX_INPUT_CHARS and len(output) <= MAX_OUTPUT_CHARS:
            return {"instruction": INSTRUCTION, "input": sentence, "output": output}


def make_splits(seed: int, n_train: int, n_val: int) -> tuple[list[dict], list[dict]]:
    """(train rows, val rows), a pure function of the arguments."""
    rng = random.Random(seed)
    train_pairs, val_pairs = split_name_pairs(rng)
    train = [make_row(rng, train_pairs) for _ in range(n_train)]
    val = [make_row(rng, val_pairs) for _ in range(n_val)]
    return train, val


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--n-train", type=int, default=1000, help="train rows (default 1000)")
    parser.add_argument("--n-val", type=int, default=100, help="val rows (default 100)")
    parser.add_argument("--out", type=Path, default=Path("data/quickstart"), help="output folder")
    args = parser.parse_args(argv)
    train, val = make_splits(args.seed, args.n_train, args.n_val)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "val.jsonl", val)
    print(f"wrote {len(train)} train and {len(val)} val rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
