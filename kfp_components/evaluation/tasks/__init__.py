"""Small offline lm-eval tasks bundled with the package (always on lm-eval's include path).

* ``kfp_capitals``: multiple choice (loglikelihood), "What is the capital of X?", metrics acc and acc_norm.
* ``kfp_arithmetic``: generate_until, short sums, metric exact_match.
* ``kfp_smoke``: a tag that names both.
* ``kfp_reasoning_arithmetic`` (tag ``kfp_reasoning``): generate_until, multi-step arithmetic word problems
  solved step by step; the answer is read as gsm8k reads it (``#### N``: strict-match; the last number:
  flexible-extract), metric exact_match. The data come from :mod:`kfp_components.testing.word_problems`.

The data are JSONL files next to the YAML, read by :mod:`.utils`, so the tasks work without the Hub.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
