"""WaffleCLIP's `waffle` prompt set: random word and character descriptors, no language model.

    from clip_utils.prompts.waffle import waffle_templates
    waffle_templates(seed=0, count=2, phrase="a type of bird")
    # ['a photo of a {}, a type of bird, which has window teacher.',
    #  'a photo of a {}, a type of bird, which has kgnk, uhmp.',
    #  'a photo of a {}, a type of bird, which has empty noodle.',
    #  'a photo of a {}, a type of bird, which has htqg, xzvx.']

Roth et al. (WaffleCLIP, ICCV 2023) found that most of the gain of descriptions written by a
language model (DCLIP's "{class}, which has {descriptor}") survives when the descriptors are
random words or random characters: what helps is averaging many prompts per class, each a
little different, more than what the descriptors say. This module draws those descriptors:

- `count` pairs: one descriptor of `WORDS_PER_DESCRIPTOR` random words from `WORDS` (a short
  list of common English words kept here, so nothing is downloaded), and one of
  `CHAR_GROUPS` groups of `CHARS_PER_GROUP` random lowercase letters joined by ", ", as
  WaffleCLIP's character descriptors are (sized here like a typical two-word class name,
  where WaffleCLIP measures its dataset's names);
- each goes into `a photo of a {}, which has <descriptor>.`, with the dataset's domain phrase
  after the class name when it has one (`a photo of a {}, a type of bird, which has ...`:
  WaffleCLIP's "+ concepts" variant, its best);
- as in WaffleCLIP, one draw is shared by every class, so the class name is the only
  difference between two classes' prompts; the set is therefore a template list (`{}` is the
  class name) and the text classifier averages its 2 x `count` prompts per class like any
  ensemble. The draw is seeded (the lab's seed): the same seed, the same prompts.

Randomness comes from `random.Random(seed).random()` alone, the one part of Python's
`random` module guaranteed to give the same numbers in every Python version.
"""

from __future__ import annotations

import random
import string

from clip_utils.errors import InvalidValue

WORDS_PER_DESCRIPTOR = 2
CHAR_GROUPS = 2
CHARS_PER_GROUP = 4

# Common English nouns and adjectives, none about flowers, birds or any other dataset's domain.
WORDS = (
    "anchor", "apple", "arrow", "autumn", "basket", "battery", "beach", "bicycle", "blanket", "bottle",
    "bridge", "brush", "bucket", "button", "cable", "candle", "canvas", "carpet", "castle", "chair",
    "chalk", "cheese", "circle", "clock", "cloud", "coffee", "copper", "cotton", "crystal", "curtain",
    "desert", "diamond", "dinner", "doctor", "dragon", "drawer", "engine", "envelope", "fabric", "fence",
    "finger", "flag", "forest", "fountain", "garden", "garlic", "glass", "glove", "granite", "guitar",
    "hammer", "harbor", "helmet", "honey", "island", "jacket", "jelly", "kettle", "keyboard", "kitchen",
    "ladder", "lantern", "lemon", "letter", "library", "magnet", "marble", "market", "meadow", "mirror",
    "monday", "motor", "mountain", "museum", "needle", "noodle", "ocean", "office", "orange", "oven",
    "paddle", "palace", "paper", "pencil", "pepper", "piano", "pillow", "planet", "pocket", "potato",
    "puzzle", "rabbit", "radio", "ribbon", "river", "rocket", "saddle", "salt", "sandal", "saucer",
    "school", "scissors", "shadow", "shelf", "silver", "socket", "spoon", "stamp", "station", "string",
    "sugar", "summer", "table", "teacher", "ticket", "timber", "tomato", "tower", "train", "tunnel",
    "umbrella", "valley", "velvet", "violin", "wagon", "wallet", "window", "winter", "wizard", "yellow",
    "bright", "broken", "calm", "clever", "dusty", "early", "empty", "fancy", "gentle", "heavy",
    "hollow", "lazy", "loud", "modern", "narrow", "plain", "quiet", "rapid", "rough", "silent",
)


def _pick(rng: random.Random, items: str | tuple[str, ...]) -> str:
    # `rng.choice` may change between Python versions; `rng.random()` may not.
    return items[int(rng.random() * len(items))]


def random_word_descriptor(rng: random.Random) -> str:
    """`WORDS_PER_DESCRIPTOR` random words from `WORDS`, e.g. `window teacher`.

    Args:
        rng: the draw's generator.
    """
    return " ".join(_pick(rng, WORDS) for _ in range(WORDS_PER_DESCRIPTOR))


def random_char_descriptor(rng: random.Random) -> str:
    """`CHAR_GROUPS` groups of random lowercase letters joined by ", ", e.g. `kgnk, uhmp`.

    Args:
        rng: the draw's generator.
    """
    letters = string.ascii_lowercase
    return ", ".join("".join(_pick(rng, letters) for _ in range(CHARS_PER_GROUP)) for _ in range(CHAR_GROUPS))


def waffle_templates(seed: int = 0, count: int = 15, phrase: str | None = None) -> list[str]:
    """WaffleCLIP's prompts: `count` random-word and `count` random-character descriptors.

    Args:
        seed: the draw's seed.
        count: descriptor pairs (WaffleCLIP's `waffle_count`; `config.WAFFLE_COUNT`).
        phrase: the dataset's domain phrase (`a type of bird`), put after the class name; None
            for a dataset without one.

    Returns:
        `2 * count` distinct templates, each with one `{}` for the class name, word and
        character descriptors alternating.
    """
    if not 1 <= count <= 1000:  # the word pairs run out long before a repeat-free draw of millions
        raise InvalidValue(f"waffle takes 1 to 1000 descriptor pairs, got {count}")
    rng = random.Random(seed)
    concept = f", {phrase.strip().rstrip('.')}" if phrase else ""
    templates: list[str] = []
    for draw in (random_word_descriptor, random_char_descriptor) * count:
        while True:  # a repeated descriptor would count twice in the class mean: draw again
            template = f"a photo of a {{}}{concept}, which has {draw(rng)}."
            if template not in templates:
                break
        templates.append(template)
    return templates
