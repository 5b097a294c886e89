"""advdef's version, in a module of its own so any layer can read it without a cycle."""

__version__ = '0.1.0'  # Keep equal to pyproject.toml's [project] version.
