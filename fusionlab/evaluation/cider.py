"""CIDEr-D (Vedantam et al. 2015, "CIDEr: Consensus-based Image Description Evaluation").

This module follows the definition used by the COCO caption evaluation code:

- n-grams of order n = 1..4, each weighted by tf-idf: raw count in the sentence times
  log(n_images) - log(max(1, df)), with df the number of images whose references contain it;
- for each order, the clipped cosine similarity between candidate and reference vectors:
  sum_g min(c_g, r_g) r_g / (|c| |r|), zero when either vector is empty;
- times the length penalty exp(-(l_c - l_r)^2 / (2 sigma^2)), sigma = 6, l = word count;
- averaged over the four orders and over the references, then times 10.

The corpus score is the mean over images. The tokenizer is a Python stand-in for the Java PTB
tokenizer: lower case, punctuation removed, split on whitespace.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

MAX_ORDER = 4
SIGMA = 6.0
_PUNCTUATION = re.compile(r"[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lower-case, drop punctuation and split on whitespace."""
    return _PUNCTUATION.sub(" ", text.lower()).split()


def ngram_counts(words: Sequence[str], max_order: int = MAX_ORDER) -> list[Counter]:
    """Count the n-grams of each order 1..max_order; element n-1 contains order n."""
    return [Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1)) for n in range(1, max_order + 1)]


def _tfidf(counts: list[Counter], df: Counter, log_n_images: float) -> tuple[list[dict], list[float]]:
    vectors, norms = [], []
    for order_counts in counts:
        vector = {g: c * (log_n_images - math.log(max(1.0, df[g]))) for g, c in order_counts.items()}
        vectors.append(vector)
        norms.append(math.sqrt(sum(v * v for v in vector.values())))
    return vectors, norms


def _similarity(candidate: tuple, reference: tuple, length_difference: int) -> list[float]:
    (cand_vectors, cand_norms), (ref_vectors, ref_norms) = candidate, reference
    penalty = math.exp(-(length_difference**2) / (2 * SIGMA**2))
    scores = []
    for c_vec, c_norm, r_vec, r_norm in zip(cand_vectors, cand_norms, ref_vectors, ref_norms):
        dot = sum(min(value, r_vec.get(g, 0.0)) * r_vec.get(g, 0.0) for g, value in c_vec.items())
        cosine = dot / (c_norm * r_norm) if c_norm and r_norm else 0.0
        scores.append(cosine * penalty)
    return scores


def cider_d(
    candidates: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> tuple[float, dict[str, float]]:
    """Score one candidate caption per image against that image's references.

    Args:
        candidates: image id -> generated caption.
        references: image id -> reference captions (at least one); the document frequencies come
            from these, over every image given.
    Returns:
        The corpus CIDEr-D (mean over images) and the score of each image.
    """
    missing = set(candidates) ^ set(references)
    if missing:
        raise ValueError(f"candidates and references must have the same image ids, these are missing from one of them: {sorted(missing)[:5]}")
    if not candidates:
        raise ValueError("cider_d needs at least one image")
    empty = [key for key, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"images {empty[:5]} have no reference caption")

    ref_counts = {key: [ngram_counts(tokenize(r)) for r in refs] for key, refs in references.items()}
    df: Counter = Counter()
    for counts_per_ref in ref_counts.values():
        df.update(set().union(*(set(order) for counts in counts_per_ref for order in counts)))
    log_n_images = math.log(len(references))

    per_image = {}
    for key, caption in candidates.items():
        cand_words = tokenize(caption)
        cand_counts = ngram_counts(cand_words)
        candidate = _tfidf(cand_counts, df, log_n_images)
        total = 0.0
        for counts in ref_counts[key]:
            ref_length = sum(counts[0].values())
            scores = _similarity(candidate, _tfidf(counts, df, log_n_images), len(cand_words) - ref_length)
            total += sum(scores) / MAX_ORDER
        per_image[key] = 10.0 * total / len(ref_counts[key])
    return sum(per_image.values()) / len(per_image), per_image
