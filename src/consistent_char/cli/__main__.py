"""``python -m consistent_char.cli``: the `consistent-char` command."""

from consistent_char.cli import main

main()
