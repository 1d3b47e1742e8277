"""Hooks for tests only; nothing here is reachable from the run config."""
