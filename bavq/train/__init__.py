"""Training application: the loop (trainer), the launcher set-up (backend), checkpoints."""
