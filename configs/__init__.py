"""ml_collections config files: `models.py` (the registry of named models) and the training recipes."""
