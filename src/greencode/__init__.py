"""GREEN-CODE: energy-aware code completion with dynamic early exit."""

__version__ = "0.1.0"
