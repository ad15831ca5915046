"""llmd-dev: the local stack."""
