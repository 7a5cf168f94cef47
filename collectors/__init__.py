"""collectors package of raee."""
