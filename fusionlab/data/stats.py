"""Data metrics for logging: counts of lost samples and the token shares that the mixture produced.

The counters come from `Batch.stats`, summed over the batches a rank has trained (see
packing.Packer for the keys). Mixture weights are per-sample probabilities, so the share of
tokens that each data type gets also depends on the lengths of its samples. The shares here are
measured from the batches, not computed from the weights.
"""

from __future__ import annotations

from fusionlab.batch import DATA_TYPES

# Counters plotted as they are: samples or images lost by reason, and no-loss padding batches.
PLOTTED_PREFIXES = ("skipped/", "images_dropped", "padding_batches")


def data_metrics(counters: dict[str, int]) -> dict[str, float]:
    """Return the counters worth plotting, plus "share/<type>" and "share/image" token fractions.

    A share is the fraction of non-padding positions that belong to documents of a data type, or
    to images, over all batches counted so far.
    """
    metrics = {key: float(n) for key, n in counters.items() if key.startswith(PLOTTED_PREFIXES)}
    tokens = sum(counters.get(f"tokens/{name}", 0) for name in DATA_TYPES)
    if tokens > 0:
        for name in (*DATA_TYPES, "image"):
            metrics[f"share/{name}"] = counters.get(f"tokens/{name}", 0) / tokens
    return metrics
