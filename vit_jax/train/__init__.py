"""Training: optimizer recipes (optim), sharded state (state), the jitted step (step), the loop (loop)."""
