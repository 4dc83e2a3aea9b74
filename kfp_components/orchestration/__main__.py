"""``python -m kfp_components.orchestration``: the same as ``fnsft-pipeline``."""

import sys

from kfp_components.orchestration.cli import main

sys.exit(main())
