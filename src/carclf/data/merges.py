"""Class merges: groups of class names that are one car model (the organisers declared five such pairs).

``merges.yaml``::

    merges:
      - [RAV4_2016_2018, 라브4_4세대_2013_2018]      # the first name is the merged class's name
      - [K5_하이브리드_3세대_2020_2023, K5_3세대_하이브리드_2020_2022]

Training uses one label per group; ``predict`` still writes every original column, sharing the group's probability
among its names by ``data.merge_split``: ``even`` (default: each name gets p / group size; right when the names
are aliases the test set uses at random) or ``prior`` (in proportion to each name's training photos).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from carclf.data.scan import nfc
from carclf.errors import CarclfError

SPLIT_POLICIES = ("even", "prior")


@dataclass
class MergeMap:
    original: list[str]  # class folder names (NFC, sorted): the submission's columns
    classes: list[str]  # the model's classes: each group's first name, and every unmerged name
    label_map: np.ndarray  # original index -> model index; -1 for a class dropped for want of photos
    share: np.ndarray  # original index -> its share of its model class's probability
    dropped_prob: float = 0.0  # the probability each dropped class's column gets (data.dropped_class_prob)
    dropped: list[str] = field(init=False)  # original names with no model class

    def __post_init__(self) -> None:
        self.dropped = [self.original[i] for i in np.where(np.asarray(self.label_map) < 0)[0]]

    @property
    def groups(self) -> list[list[str]]:
        out = []
        for m in range(len(self.classes)):  # dropped classes (-1) are in no group
            members = [self.original[i] for i in np.where(self.label_map == m)[0]]
            if len(members) > 1:
                out.append(members)
        return out

    def expand(self, probs: np.ndarray) -> np.ndarray:
        """Model-class probabilities -> original-class probabilities (rows still sum to 1). A dropped class gets
        ``dropped_prob``; the others are scaled down to make room for it."""
        kept = self.label_map >= 0
        out = probs[:, np.maximum(self.label_map, 0)] * self.share[None, :]
        if not kept.all():
            out[:, kept] *= 1.0 - self.dropped_prob * (~kept).sum()
            out[:, ~kept] = self.dropped_prob
        return out

    def drop(self, model_classes: list[str], prob: float) -> MergeMap:
        """The same map without ``model_classes`` (each with every name merged into it); their columns get
        ``prob``."""
        gone = set(model_classes)
        keep = [c for c in self.classes if c not in gone]
        index = {c: i for i, c in enumerate(keep)}
        label_map = np.array([index.get(self.classes[m], -1) if m >= 0 else -1 for m in self.label_map])
        return MergeMap(list(self.original), keep, label_map, self.share.copy(), float(prob))

    def to_dict(self) -> dict:
        return {"original": self.original, "classes": self.classes, "label_map": self.label_map.tolist(),
                "share": self.share.tolist(), "dropped_prob": self.dropped_prob, "dropped": self.dropped}

    @classmethod
    def from_dict(cls, d: dict) -> MergeMap:
        return cls(d["original"], d["classes"], np.asarray(d["label_map"]), np.asarray(d["share"], dtype=float),
                   float(d.get("dropped_prob", 0.0)))


def identity(classes: list[str]) -> MergeMap:
    n = len(classes)
    return MergeMap(list(classes), list(classes), np.arange(n), np.ones(n))


def read_merges(path: Path | str) -> list[list[str]]:
    path = Path(path)
    if not path.is_file():
        raise CarclfError(f"merges file '{path}' not found (data.merges=PATH, or leave it empty)")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CarclfError(f"'{path}' is not valid UTF-8 YAML: {exc}") from exc
    groups = doc.get("merges") if isinstance(doc, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, list) and len(g) >= 2 for g in groups):
        raise CarclfError(f"'{path}' must hold 'merges:' followed by a list of lists of two or more class names")
    return [[nfc(str(n)) for n in g] for g in groups]


def build_merge_map(
    classes: list[str], groups: list[list[str]], policy: str = "even", counts: np.ndarray | None = None,
    source: str = "merges.yaml",
) -> MergeMap:
    """Validate ``groups`` against the trained class names and build the label mapping."""
    if policy not in SPLIT_POLICIES:
        raise CarclfError(f"data.merge_split='{policy}' must be one of {', '.join(SPLIT_POLICIES)}")
    index = {c: i for i, c in enumerate(classes)}
    seen: dict[str, int] = {}
    for g, names in enumerate(groups):
        for n in names:
            if n not in index:
                close = difflib.get_close_matches(n, classes, n=1, cutoff=0.6)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise CarclfError(f"{source}: '{n}' is not a class folder under train/.{hint}")
            if n in seen:
                raise CarclfError(f"{source}: '{n}' appears in two merge groups ({seen[n] + 1} and {g + 1})")
            seen[n] = g
    head = {names[0]: names for names in groups}
    model_classes = sorted(c for c in classes if c not in seen or c in head)
    m_index = {c: i for i, c in enumerate(model_classes)}
    label_map = np.empty(len(classes), dtype=np.int64)
    share = np.ones(len(classes))
    for c, i in index.items():
        label_map[i] = m_index[groups[seen[c]][0]] if c in seen else m_index[c]
    for names in groups:
        idx = [index[n] for n in names]
        if policy == "prior" and counts is not None and counts[idx].sum() > 0:
            share[idx] = counts[idx] / counts[idx].sum()
        else:
            share[idx] = 1.0 / len(idx)
    return MergeMap(list(classes), model_classes, label_map, share)
