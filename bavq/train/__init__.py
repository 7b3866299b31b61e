"""The training application (bavq-train): the entry point (main), the loop (trainer, build), checkpoints,
DeepSpeed plugins, run logging, the run lock and the watchdog."""
