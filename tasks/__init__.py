"""Prefect tasks: a few lines each, calling the tlops library."""
