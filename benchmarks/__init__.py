"""Speed and learning measurements; each reports a ratio against a baseline run in the same process."""
