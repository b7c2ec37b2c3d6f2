#!/usr/bin/env python
"""Paper figures from several superweight runs (same as `superweight figures`).

    python scripts/figures.py outputs/sweeps/smoke-<hash>            # a sweep dir: every run under it
    python scripts/figures.py run_a run_b --out paper_figs --k 100    # chosen out_dirs
    python scripts/figures.py wandb:ENTITY/PROJECT/GROUP              # online: the runs' W&B artifacts
    python scripts/figures.py wandb:ENTITY/PROJECT --sweep SWEEP_ID
"""

import sys

from superweight.commands import main

if __name__ == "__main__":
    sys.exit(main(["figures", *sys.argv[1:]]))
