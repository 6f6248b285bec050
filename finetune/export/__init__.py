"""Artifact formats. Format code lives only here."""
