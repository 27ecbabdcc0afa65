"""Class descriptions as a prompt set: the JSON files CuPL and DCLIP publish.

    prompts = description_set("cub_descriptors.json", lab.class_names("cub200"), lab.label_map("cub200"))
    prompts["Black-footed Albatross"]
    # ['Black-footed Albatross, which has a large, hooked bill', ...]       (DCLIP fragments)
    # ['A Black-footed Albatross is a large seabird with dark plumage.', ...]  (CuPL sentences)

Both projects ship one JSON object, `{"class name": ["description", ...]}`: DCLIP (Menon &
Vondrick, 2023) short descriptor fragments (`black and white plumage`, `a long, hooked
bill`), CuPL (Pratt et al., 2023) whole sentences written by a language model about each
class. The file is read once per lab (`Lab(descriptions=...)`, `--descriptions FILE`) and
becomes the `descriptions` prompt set: a class's weight vector is the normalised mean of its
prompts' embeddings, as for any ensemble, only the prompts differ from class to class.

Matching the file to the dataset. A file's keys are whatever names its authors used, so each
class is looked up by its curated name, then by the dataset's original name, case-insensitively
and with underscores as spaces (`black_footed_albatross` matches `Black footed Albatross`), and
finally by letters and digits alone (`Black-footed Albatross` matches `Black footed Albatross`)
when that form is unambiguous in the file. A class with no (non-empty) entry stops the run with
one error listing every such class; keys that match no class are ignored (a file written for
a larger label set still works).

Each description becomes one prompt, decided per description:

- it names the class (its curated or original name, or the file's key for it, as a whole
  word, case-insensitively): a CuPL sentence, used as it is;
- a sentence that does not name it (it ends in `.`, `!` or `?`, which DCLIP's fragments never
  do): `{class}: {sentence}`, so the prompt still says which class it describes;
- otherwise a DCLIP descriptor fragment, joined as DCLIP does, `{class}, which (is/has/...)
  {descriptor}`: `which is` before `a`/`an`/`used ...`, `which` before `has`, `often`,
  `typically`, `may`, `can` (and a fragment already starting with `which`), `which has`
  otherwise. DCLIP tests the first letters (`all white` becomes "which is all white"); here
  the first word is tested.

The class name put into prompts is the lab's (curated by default, `--class-names`).
Duplicate descriptions of a class are kept once, so they do not weigh twice in its mean.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from clip_utils.errors import InvalidValue
from clip_utils.runtime.files import regular_file

# DCLIP's `make_descriptor_sentence`, on whole first words.
_WHICH_IS = ("a", "an", "used")
_WHICH = ("has", "have", "often", "typically", "may", "can", "which")
LISTED = 20  # missing classes named in the error before "and N more"


class DescriptionsError(InvalidValue):
    """A descriptions file that cannot be used; the message names the file and what is wrong."""


def read_descriptions(path: str | Path) -> dict[str, list[str]]:
    """Read and check a CuPL/DCLIP descriptions file: `{"class name": ["description", ...]}`.

    Args:
        path: the JSON file.

    Raises:
        FileNotFoundError: no such file.
        DescriptionsError: not JSON, or not an object of lists of strings.
    """
    path = regular_file(path, "descriptions file")  # missing, a folder or a pipe: one line, never a blocked read
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DescriptionsError(f"{path} is not a JSON file ({err})") from err
    if not isinstance(data, dict):
        raise DescriptionsError(f"{path} must hold one JSON object {{\"class name\": [\"description\", ...]}}, "
                                f"not a {type(data).__name__}")
    bad = [k for k, v in data.items() if not (isinstance(v, list) and all(isinstance(d, str) for d in v))]
    if bad:
        raise DescriptionsError(f"{path}: the value of each class must be a list of strings; not so for "
                                f"{', '.join(repr(k) for k in bad[:5])}{' ...' if len(bad) > 5 else ''}")
    return data


def _key(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).casefold()


def _loose(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.casefold())


def match_descriptions(descriptions: Mapping[str, Sequence[str]], class_names: Sequence[str],
                       original_names: Sequence[str], source: str = "the descriptions file"
                       ) -> list[tuple[str, list[str]]]:
    """The descriptions of every class in label order, found under any of its names.

    Args:
        descriptions: what `read_descriptions` returned.
        class_names: the curated names, in label order.
        original_names: the dataset's own names, in label order.
        source: how the error names the file.

    Returns:
        `(the file's key, its non-empty descriptions without repeats)` per class.

    Raises:
        DescriptionsError: classes without descriptions (all of them listed, up to `LISTED`).
    """
    if len(class_names) != len(original_names):
        raise ValueError(f"{len(class_names)} class names but {len(original_names)} original names")
    exact: dict[str, str] = {}
    loose: dict[str, str | None] = {}
    for key in descriptions:
        exact.setdefault(_key(key), key)
        # Two keys with the same letters (`Sea-Lake`, `sea lake`) make the loose form ambiguous.
        loose[_loose(key)] = None if _loose(key) in loose and loose[_loose(key)] != key else key
    out, missing = [], []
    for name, original in zip(class_names, original_names, strict=True):
        key = (exact.get(_key(name)) or exact.get(_key(original))
               or loose.get(_loose(name)) or loose.get(_loose(original)))
        found = list(dict.fromkeys(d.strip() for d in descriptions[key] if d.strip())) if key else []
        if not found:
            missing.append(name if _key(name) == _key(original) else f"{name} ({original})")
        out.append((key or "", found))
    if missing:
        listed = ", ".join(missing[:LISTED]) + (f" and {len(missing) - LISTED} more" if len(missing) > LISTED else "")
        raise DescriptionsError(f"{source} has no descriptions for {len(missing)} of {len(class_names)} classes: "
                                f"{listed}. Its keys must be the class names (curated or original, any case)")
    return out


def _names(text: str, names: Sequence[str]) -> bool:
    low = _key(text)
    return any(re.search(rf"(?<!\w){re.escape(_key(n))}(?!\w)", low) for n in names if n.strip())


def description_prompt(class_name: str, description: str, aliases: Sequence[str] = ()) -> str:
    """One description as a prompt (see the module docstring for the rules).

    Args:
        class_name: the name put into the prompt.
        description: a CuPL sentence or a DCLIP descriptor fragment.
        aliases: other names of the class that count as naming it.
    """
    text = description.strip()
    if _names(text, [class_name, *aliases]):
        return text
    if text.endswith((".", "!", "?")):
        return f"{class_name}: {text}"
    first = text.split(maxsplit=1)[0].casefold() if text else ""
    if first in _WHICH_IS:
        clause = f"which is {text}"
    elif first in _WHICH:
        clause = text if first == "which" else f"which {text}"
    else:
        clause = f"which has {text}"
    return f"{class_name}, {clause}"


def description_set(path: str | Path, class_names: Sequence[str],
                    original_names: Sequence[str]) -> dict[str, list[str]]:
    """The `descriptions` prompt set of a dataset: `{class name: [prompt, ...]}` in label order.

    Args:
        path: a CuPL or DCLIP JSON file.
        class_names: the names prompts use (the lab's naming), in label order.
        original_names: the dataset's own names, in label order (also matched, never printed).

    Raises:
        FileNotFoundError: no such file.
        DescriptionsError: unreadable file, or classes without descriptions.
    """
    per_class = match_descriptions(read_descriptions(path), class_names, original_names, str(path))
    prompts: dict[str, list[str]] = {}
    for name, original, (key, found) in zip(class_names, original_names, per_class, strict=True):
        made = [description_prompt(name, d, [original, key]) for d in found]
        prompts.setdefault(name, list(dict.fromkeys(made)))
    return prompts
