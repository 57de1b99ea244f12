"""The main jobs behind ``python -m pointconv demo``."""
