"""The shapes world: a tiny procedural text-to-image world, its base model and evaluator (see world.py)."""
