"""`python -m ef_jax.cli ...` runs the `ef-jax` command line."""
import sys

from ef_jax.cli.commands import main

sys.exit(main())
