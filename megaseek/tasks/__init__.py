"""Objectives: what a training step minimises. The loop and the schedule know none of them."""
