"""The package version (written into checkpoints' metadata, printed by `nsa --version`)."""

__version__ = "0.1.0"
