"""Evaluation: batched generation, the keyword judge and task metrics (harmful score and accuracy)."""
