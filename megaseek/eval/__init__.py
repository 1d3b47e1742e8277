"""Downstream evaluation: task files built from held-out corpus text (build.py, tasks/), a megaseek model for
lm-evaluation-harness (lm.py), a runner returning flat metrics for training callbacks and launch/evaluate.py
(downstream.py), and batch-1 inference latency (latency.py)."""
