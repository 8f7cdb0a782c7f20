"""`python -m egoslots ...` runs the same command line as the `egoslots` script."""

from egoslots.cli import main

main()
