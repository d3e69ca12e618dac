"""Training-loop support: checkpoints, metrics logging, sample grids."""
