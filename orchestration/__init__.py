"""orchestration package of raee."""
