"""inference_workers package of raee."""
