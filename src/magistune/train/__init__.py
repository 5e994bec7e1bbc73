"""The training stage: batches, loss, optimizer, checkpoints, metrics, and the loop (recipe.py)."""
