"""Training: the Lightning recipe of the paper (losses, one-cycle schedule, two phases), LR finder."""
