"""Plan a run before starting it: `python launch/plan.py +cluster=512xA100 model=large [overrides]`.

Memory per GPU (parameters, gradients, optimizer states, activations, buffers), whether it fits, the
pipeline bubble, communication per step, step time, tokens/s and MFU for the configured layout and the
best layouts that fit. Exit status 2 when the configured layout is refused. See megaseek/planner/cli.py.
"""
import sys


from megaseek.planner.cli import main

if __name__ == "__main__":
    sys.exit(main())
