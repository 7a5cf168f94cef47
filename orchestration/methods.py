"""The methods `raee eval` compares, in report order, with their titles: read by the evaluation and the report."""

from __future__ import annotations

METHOD_TITLES: dict[str, str] = {
    # the LM head (the paper's read-out of the label words)
    "full": "Full model (last layer)",
    "full_cal": "Full model, calibrated last layer",
    "raee": "RAEE (paper)",
    "raee_wo": "RAEE w/o (only-correct db)",
    "raee_cal": "RAEE, calibrated view",
    "fused": "Fused: calibrated layer x neighbour vote (default)",
    "confident": "Confident: entropy exit on layer x vote",
    "fixed_trunc": "Fixed truncation at RAEE's mean exit",
    "confidence": "Confidence exit (zero-shot)",
    "knn": "kNN label vote (no backbone)",
    "oracle": "Oracle (earliest correct layer)",
    # the paper's peers (docs/peers.md)
    "deebert": "DeeBERT (off-ramps, entropy exit)",
    "adainfer": "AdaInfer (stop classifier)",
    "calm_sr": "CALM softmax response (zero-shot)",
    "calm_sr_tuned": "CALM softmax response (tuned)",
    "calm_sat": "CALM state saturation (zero-shot)",
    "calm_sat_tuned": "CALM state saturation (tuned)",
    "sleb": "SLEB (int(0.6 L) blocks removed)",
    # RAEE over trained off-ramps (raee build --head offramp)
    "full_or": "Off-ramp head: last layer",
    "full_cal_or": "Off-ramp head: last layer, calibrated",
    "raee_or": "Off-ramp head: RAEE (Eq. 4-6)",
    "raee_cal_or": "Off-ramp head: RAEE, calibrated view",
    "fused_or": "Off-ramp head: fused",
    "confident_or": "Off-ramp head: confident",
    "oracle_or": "Off-ramp head: oracle",
}
METHODS: list[str] = list(METHOD_TITLES)
ENGINE_METHODS: dict[str, str] = {"raee": "raee", "raee_cal": "raee-cal", "fused": "fused",
                                  "confident": "confident"}  # method -> policy
HEADLINE = "fused"  # the default policy's method: what --fail-under checks
PEERS = ("deebert", "adainfer", "calm_sr", "calm_sr_tuned", "calm_sat", "calm_sat_tuned", "sleb")
