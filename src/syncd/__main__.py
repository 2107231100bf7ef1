"""``python -m syncd`` runs the ``syncd`` command."""

from syncd.cli import run

run()
