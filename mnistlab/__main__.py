"""`python -m mnistlab` is the `mnistlab` command."""

from mnistlab.cli import main

main()
