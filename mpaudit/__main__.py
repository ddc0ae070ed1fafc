"""``python -m mpaudit`` is the ``mpaudit`` command."""

from mpaudit.cli import main

main()
