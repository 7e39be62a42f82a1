"""What every stage uses: the command-line conventions, storage locations, the store schema and the trial/sweep folder layouts."""
