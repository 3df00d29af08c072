"""Condense Inductor's AUTOTUNE reports (stderr of tune_configs.py) to one line per choice.

    python benchmarks/autotune_summary.py tune.log
"""

from __future__ import annotations

import re
import sys

_FIELDS = re.compile(r"\b(BLOCK_[MN]\d?|num_warps|num_stages)=(\d+)")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for path in argv:
        with open(path) as log:
            for line in log:
                header = line.startswith(("AUTOTUNE ", "## ", "flex_inductor_"))
                if header and "autotuning " not in line:
                    print(line.rstrip()[:160])
                elif line.startswith("  triton_"):
                    name, ms, pct = line.split()[:3]
                    fields = " ".join(f"{k}={v}" for k, v in _FIELDS.findall(line))
                    print(f"  {ms} ms {pct} {fields}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
