"""``python -m dynconv`` is the ``dynconv`` command."""
import sys

from dynconv.cli import main

sys.exit(main())
