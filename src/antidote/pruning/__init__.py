"""The pruning engine: target choice, calibration statistics, scores and mask selection."""
