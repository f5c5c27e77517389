"""`python -m svnr_fast.app.cli ...` is the `svnr` command."""
import sys

from . import main

sys.exit(main())
