"""Stage 3: the Ray Tune sweep, its ledger, the results aggregator, reports and Grad-CAM."""
