"""Side-by-side benchmark harness for simplenn-serve (see bench/README.md and bench/run.py)."""
