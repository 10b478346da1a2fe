"""Formats both ends of a wire agree on: recipes, versions, configuration, errors. No I/O."""
