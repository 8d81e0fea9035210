"""The package's version, in a module of its own (imported by the OpenAPI document without the package root)."""

__version__ = "0.1.0"
