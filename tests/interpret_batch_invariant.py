"""The batch-invariant kernels and decode mode under Triton's CPU interpreter; prints the outcome as one JSON line.

Run by test_batch_invariant.py as ``TRITON_INTERPRET=1 python tests/interpret_batch_invariant.py kernels|engine``
(the variable must be set before triton is imported, hence a separate process).
"""

import json
import sys

from batch_invariant_checks import engine_checks, kernel_checks
from triton_interpreter import round_bfloat16_casts_to_nearest, widen_bfloat16_in_dots

if __name__ == "__main__":
    widen_bfloat16_in_dots()
    round_bfloat16_casts_to_nearest()
    part = sys.argv[1]
    outcome = kernel_checks("cpu") if part == "kernels" else engine_checks("cpu")
    print(json.dumps(outcome))
