"""The methods `raee eval` compares, in report order, with their titles: read by the evaluation and the report."""

from __future__ import annotations

METHODS: list[str] = ["full", "full_cal", "raee", "raee_wo", "raee_cal", "fused", "fixed_trunc", "confidence",
                      "knn", "oracle"]
METHOD_TITLES: dict[str, str] = {
    "full": "Full model (last layer)", "full_cal": "Full model, calibrated last layer",
    "raee": "RAEE (paper)", "raee_wo": "RAEE w/o (only-correct db)",
    "raee_cal": "RAEE, calibrated view", "fused": "Fused: calibrated layer x neighbour vote (default)",
    "fixed_trunc": "Fixed truncation at RAEE's mean exit", "confidence": "Confidence exit (zero-shot)",
    "knn": "kNN label vote (no backbone)", "oracle": "Oracle (earliest correct layer)",
}
ENGINE_METHODS: dict[str, str] = {"raee": "raee", "raee_cal": "raee-cal", "fused": "fused"}  # method -> policy
HEADLINE = "fused"  # the default policy's method: what --fail-under checks
