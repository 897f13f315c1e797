"""``python -m rewards.preference_model train ...``."""

import sys

from .train import main

sys.exit(main())
