"""`python -m app.cli` = the `lorastudio` command."""

import sys

from app.cli import main

sys.exit(main())
