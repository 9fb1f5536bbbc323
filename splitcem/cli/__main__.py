"""``python -m splitcem.cli``."""

from splitcem.cli import main

main()
