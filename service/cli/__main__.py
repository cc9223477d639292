"""`python -m service.cli ...`: the `vqtrain` command line."""

from service.cli import main

main()
