"""One module per stage. Each reads what earlier stages committed to the run folder and
commits its own outputs (see pipeline/run.py for the folder layout)."""
