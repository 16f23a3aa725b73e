"""`python -m autointerp.cli`: the same as the `autointerp` command."""

from autointerp.cli import main

main()
