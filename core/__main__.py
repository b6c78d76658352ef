"""`python -m core`: the Binsight command line."""
from core.cli import main

raise SystemExit(main())
