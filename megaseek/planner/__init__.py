"""Memory, communication and throughput estimates from the model config, the parallel layout and a
cluster preset (conf/cluster/). `launch/plan.py` prints them; `preflight()` runs them at every start."""
from megaseek.planner.hardware import Hardware
from megaseek.planner.memory import Memory, estimate_memory
from megaseek.planner.plan import Plan, layout_problems, make_plan, search
from megaseek.planner.setup import Setup

__all__ = ["Hardware", "Memory", "Plan", "Setup", "estimate_memory", "layout_problems", "make_plan", "search"]
