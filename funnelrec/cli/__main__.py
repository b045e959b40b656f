"""`python -m funnelrec.cli`: the same as the `funnelrec` console script."""

from funnelrec.cli import main

main()
