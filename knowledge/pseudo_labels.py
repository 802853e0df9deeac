"""Caption-noun pseudo labels for pseudo boxes and their confidence weight (METHOD 1.4).

* ``NounMatcher`` finds vocabulary nouns in captions: the longest word sequence first (so
  "teddy bear" is not a "bear"), singular or plural (regular plurals by rule, irregular ones
  listed in the vocabulary file as variants: ``person|people|man|men``), hyphens and underscores
  read as spaces. It returns the canonical name (the first entry of its line), which is what
  gets embedded with the prompt ensemble.
* Vocabulary file format: one ``canonical|variant|...`` entry per line, ``#`` comments. Shapes-OV
  uses the 16 class names (``teacher.noun_vocab: ""``); COCO ships ``vocab/coco_nouns.txt``.
* ``assign_nouns``: each pseudo box takes the caption noun with the highest cosine between its
  CLIP box embedding v and the noun's text embedding t (most plausible reading of the official
  pipeline; only (v, t) reach the training code).
* ``NounBank``: prompt-ensembled noun embeddings, computed once per noun (the class texts' function).
* ``pseudo_weight``: w = a * sigmoid((cos(v, t) - mu) / sigma). The official constants (1.3,
  0.31, 0.026) were tuned for ViT-B/32 with DetPro prompts; ``calibrate_weight`` fits them for the
  teacher at hand (how: its docstring).

References: docs/METHOD.md §1.4 (official `proposal_clip_text_embedding` and the weight formula);
HD-OVD Fig. 3 "Caption & Parse Noun".
Deviations: the official parser is unknown (NLTK/spaCy); a vocabulary match is used instead,
so nouns outside the vocabulary are never pseudo labels.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

import config

_WORD = re.compile(r"[a-z0-9]+")  # "man's" -> "man", "s"; "hot-dog" -> "hot", "dog"


def _words(text: str) -> tuple[str, ...]:
    """Lower-case word tuple of a caption or a vocabulary name ('_' and '-' split words)."""
    return tuple(_WORD.findall(text.lower().replace("_", " ")))


def plural_forms(word: str) -> list[str]:
    """Regular English plurals of a noun (the vocabulary file lists the irregular ones)."""
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return [word + "es"]
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        return [word[:-1] + "ies"]
    if word.endswith("fe"):
        return [word + "s", word[:-2] + "ves"]
    if word.endswith("f"):
        return [word + "s", word[:-1] + "ves"]
    if word.endswith("o"):
        return [word + "s", word + "es"]
    return [word + "s"]


def read_noun_vocab(path: str | Path) -> list[list[str]]:
    """Entries [canonical, variant, ...] from a file of ``canonical|variant|...`` lines (# comments)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher.noun_vocab '{path}' not found (one noun per line, "
                                f"'canonical|variant|...'; e.g. vocab/coco_nouns.txt)")
    entries = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            entries.append([v.strip() for v in line.split("|") if v.strip()])
    if not entries:
        raise ValueError(f"teacher.noun_vocab '{path}' lists no nouns")
    return entries


class NounMatcher:
    """Finds vocabulary nouns in text: longest word sequence first, singular or plural.

    ``NounMatcher([["teddy bear"], ["person", "people", "man"]]).find("Two men hug a teddy bear")``
    -> ["person", "teddy bear"]: canonical names, in order of first mention, each once. The plural
    of a multi-word name pluralises its last word ("hot dogs"). When two entries share a surface
    form the earlier entry wins.
    """

    def __init__(self, entries: list[list[str]]):
        self.forms: dict[tuple[str, ...], str] = {}
        for canonical, *variants in entries:
            for name in [canonical, *variants]:
                words = _words(name)
                if not words:
                    continue
                for form in [words] + [words[:-1] + (p,) for p in plural_forms(words[-1])]:
                    self.forms.setdefault(form, canonical)
        self.max_len = max(len(f) for f in self.forms)

    def find(self, text: str) -> list[str]:
        words, found, i = _words(text), [], 0
        while i < len(words):
            for n in range(min(self.max_len, len(words) - i), 0, -1):
                name = self.forms.get(words[i:i + n])
                if name is not None:
                    if name not in found:
                        found.append(name)
                    i += n
                    break
            else:
                i += 1
        return found


def build_noun_matcher(cfg) -> NounMatcher:
    """teacher.noun_vocab, or the class names (base + novel) when it is empty."""
    if cfg.teacher.noun_vocab:
        return NounMatcher(read_noun_vocab(cfg.teacher.noun_vocab))
    return NounMatcher([[n] for n in config.class_names(cfg)])


def caption_nouns(cfg, matcher: NounMatcher) -> dict[int, list[str]]:
    """image id -> nouns of all its captions (data.captions, COCO captions format); ``{}`` when
    ``data.captions`` is "" (a dataset without captions: every image takes the noun list)."""
    if not cfg.data.captions:
        return {}
    path = Path(cfg.data.root) / cfg.data.captions
    if not path.is_file():
        raise FileNotFoundError(f"captions file '{path}' (data.captions) not found; Shapes-OV: "
                                f"`python -m shapes_ov --config config.yaml`; COCO: "
                                f"annotations/captions_train2017.json from cocodataset.org; a dataset "
                                f"without captions: set data.captions to \"\" (pseudo labels then "
                                f"come from teacher.noun_vocab, or the class names)")
    try:
        anns = json.loads(path.read_text())["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"captions file '{path}' is not COCO captions format: {e!r}") from None
    nouns: dict[int, list[str]] = {}
    for ann in anns:
        found = nouns.setdefault(int(ann["image_id"]), [])
        found += [n for n in matcher.find(ann["caption"]) if n not in found]
    return nouns


def pseudo_weight(cos, a: float, mu: float, sigma: float):
    """w = a * sigmoid((cos - mu) / sigma) (METHOD 1.4; official ViT-B/32 DetPro: 1.3, 0.31, 0.026)."""
    return a * torch.sigmoid((cos - mu) / sigma)


def assign_nouns(box_emb, noun_emb):
    """Best caption noun per box: (index (R,), cosine (R,)) of argmax_n cos(v_r, t_n)."""
    cos = box_emb @ noun_emb.T  # (R, N)
    best, idx = cos.max(1)
    return idx, best


def calibrate_weight(cos, correct, l2: float = 1e-3, steps: int = 50) -> dict:
    """Fit P(noun right | cos) = sigmoid((cos - mu) / sigma), and a = 1 / mean(sigmoid | right).

    Samples (knowledge/extract.py ``_calibration``): every (train GT box of a base class, caption noun of its
    image) pair, ``correct`` = the noun is the box's class. The truth is known for base boxes only,
    and pairing with every caption noun (not only the best one) gives wrong pairs even when the
    teacher picks the right noun for every box. Logistic regression by Newton steps, with a ridge
    on the slope of ``l2`` times its typical curvature (n * var(cos)): ~1% bias, but finite when
    the classes separate perfectly. ``a`` makes a right pair weigh 1 on average, like a GT box.
    """
    x, t = cos.double(), correct.double()
    if len(x) < 2 or t.min() == t.max():
        raise ValueError(f"cannot calibrate the pseudo-label weight from {len(x)} (box, noun) "
                         f"pairs with {int(t.sum())} right; set teacher.weight_a/mu/sigma in the "
                         f"config")
    feats = torch.stack([x - x.mean(), torch.ones_like(x)], 1)  # (n, 2), centred for conditioning
    theta = torch.zeros(2, dtype=torch.double)
    reg = torch.diag(torch.tensor([l2 * len(x) * float(x.var()), 0.0], dtype=torch.double))
    for _ in range(steps):  # Newton-Raphson on the penalised log-likelihood
        p = torch.sigmoid(feats @ theta)
        grad = feats.T @ (p - t) + reg @ theta
        hess = feats.T @ (feats * (p * (1 - p))[:, None]) + reg + 1e-9 * torch.eye(2)
        theta = theta - torch.linalg.solve(hess, grad)
    slope, bias = theta.tolist()
    if slope <= 0:
        raise ValueError("the teacher's cosine does not predict a right caption noun (slope "
                         f"{slope:.3g}); set teacher.weight_a/mu/sigma in the config")
    mu, sigma = float(x.mean()) - bias / slope, 1.0 / slope
    fitted = torch.sigmoid((x - mu) / sigma)
    a = 1.0 / float(fitted[t > 0].mean())
    return {"a": a, "mu": mu, "sigma": sigma, "num_samples": len(x),
            "frac_correct": float(t.mean())}


class NounBank:
    """Caches noun embeddings: ``embed(nouns) -> (N, D)`` is the class texts' function (clip_io's
    prompt-ensembled ``text_embeddings`` with the same templates), so a noun equal to a class name
    is that class's vector. ``fallback``: the candidate nouns of an image without caption nouns."""

    def __init__(self, embed, class_names, class_emb, fallback: list[str]):
        self.embed = embed
        self.emb = dict(zip(class_names, class_emb))
        self.fallback = list(fallback)
        self.add(self.fallback)

    def add(self, nouns):
        # one batched text forward for all new nouns (COCO: ~1,300 nouns x 80 templates)
        new = sorted({n for n in nouns if n not in self.emb})
        if new:
            self.emb.update(zip(new, self.embed(new)))

    def candidates(self, nouns: list[str]):
        """(nouns, (N, D)); an image without caption nouns falls back to the noun list."""
        nouns = nouns or self.fallback
        return nouns, torch.stack([self.emb[n] for n in nouns])
