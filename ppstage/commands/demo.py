"""``ppstage demo``: the main job. Until the distributed runtime lands it prints the plan table."""

from __future__ import annotations

import argparse

from . import plan

HELP = "run the pipeline demo (currently: the plan of a scripted stream)"
add_arguments = plan.add_arguments
run = plan.run
