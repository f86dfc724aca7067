"""Training data: the synthetic benchmark and its conversations in the VPT multi-round format."""
