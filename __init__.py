"""kvbench: a benchmark harness for KV-cache compression methods."""

__version__ = "0.1.0"
