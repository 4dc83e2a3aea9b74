"""Small offline lm-eval tasks bundled with the package (always on lm-eval's include path).

* ``kfp_capitals``: multiple choice (loglikelihood), "What is the capital of X?", metrics acc and acc_norm.
* ``kfp_arithmetic``: generate_until, short sums, metric exact_match.
* ``kfp_smoke``: a tag that names both.

The data are JSONL files next to the YAML, read by :mod:`.utils`, so the tasks work without the Hub.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
