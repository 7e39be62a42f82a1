"""Results analysis: load a finished (or running) sweep, compare trials, write tables, figures and the report."""
