"""The `kvbench` command line: thin click commands over the library functions."""

from __future__ import annotations

import functools
import sys

import click

from kvbench.errors import KvbenchError


def one_line_errors(command):
    """Turn a KvbenchError (and a missing file or a broken pipe) into one line and exit 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KvbenchError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kvbench")
def main():
    """kvbench: KV-cache compression methods on LongBench and Needle-in-a-Haystack."""
