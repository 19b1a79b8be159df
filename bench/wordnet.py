"""A real labelled text set, offline: WordNet 3.0 noun glosses labelled by their lexicographer file.

    apt-get download wordnet-base && dpkg -x wordnet-base_*.deb /tmp/wn
    python bench/wordnet.py --wordnet /tmp/wn --out /tmp/wordnet_texts            # textfolder: <class>/<offset>.txt
    tlops run -S data.source=textfolder -S data.path=/tmp/wordnet_texts

Each synset's gloss (its definition and usage examples, without the synset's own words) is one text; its class is
the lexicographer file (noun.animal, noun.food, ...). A fixed sample per class (by synset offset, seeded) keeps the
set small enough for a 2-core CPU. Nothing is committed: the data stays where --out says.
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict
from pathlib import Path

# WordNet's fixed lexicographer file numbers for nouns (lexnames(5WN)).
LEXNAMES = {3: "noun.Tops", 4: "noun.act", 5: "noun.animal", 6: "noun.artifact", 7: "noun.attribute",
            8: "noun.body", 9: "noun.cognition", 10: "noun.communication", 11: "noun.event", 12: "noun.feeling",
            13: "noun.food", 14: "noun.group", 15: "noun.location", 16: "noun.motive", 17: "noun.object",
            18: "noun.person", 19: "noun.phenomenon", 20: "noun.plant", 21: "noun.possession", 22: "noun.process",
            23: "noun.quantity", 24: "noun.relation", 25: "noun.shape", 26: "noun.state", 27: "noun.substance",
            28: "noun.time"}
CLASSES = ("noun.animal", "noun.artifact", "noun.body", "noun.food", "noun.location", "noun.person", "noun.plant",
           "noun.substance")


def glosses(data_noun: Path) -> dict[str, list[tuple[str, str]]]:
    """{lexname: [(synset offset, gloss)]} of data.noun (license header lines skipped)."""
    out: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for line in data_noun.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("  ") or "|" not in line:
            continue
        head, gloss = line.split("|", 1)
        fields = head.split()
        out[LEXNAMES.get(int(fields[1]), fields[1])].append((fields[0], gloss.strip()))
    return out


def write_glosses(data_noun: Path, out: Path, per_class: int = 400, classes: tuple[str, ...] | list[str] = CLASSES,
                  seed: int = 0) -> dict[str, tuple[int, int]]:
    """out/<lexname>/<offset>.txt: a seeded sample of per_class glosses of each class; {class: (written, had)}."""
    by_class = glosses(data_noun)
    rng = random.Random(seed)
    counts = {}
    for name in classes:
        items = sorted(by_class[name])
        chosen = rng.sample(items, min(per_class, len(items)))
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for offset, gloss in chosen:
            (folder / f"{offset}.txt").write_text(gloss + "\n", encoding="utf-8")
        counts[name] = (len(chosen), len(items))
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wordnet", type=Path, required=True, help="where wordnet-base was unpacked (dpkg -x)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--per-class", type=int, default=400)
    ap.add_argument("--classes", default=",".join(CLASSES))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    data = next(args.wordnet.rglob("data.noun"), None)
    if data is None:
        raise SystemExit(f"no data.noun under {args.wordnet}: apt-get download wordnet-base; dpkg -x it there")
    for name, (written, had) in write_glosses(data, args.out, args.per_class, args.classes.split(","),
                                              args.seed).items():
        print(f"{name}: {written} of {had} glosses")


if __name__ == "__main__":
    main()
