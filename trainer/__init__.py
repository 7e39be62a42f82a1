"""Stage 2: one trial (model, resolution, seed[, task]) trained and evaluated, resumable."""
