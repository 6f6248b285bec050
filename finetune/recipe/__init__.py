"""Recipes: the YAML schema, its loading and its checks."""
