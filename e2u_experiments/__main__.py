"""``python -m e2u_experiments`` = the ``e2u`` command."""

from e2u_experiments.cli import entry_point

entry_point()
