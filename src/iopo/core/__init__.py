"""Layer 0, pure math: losses, completion log-probs, the methods' tables, statistics and number formatting.
Functions of tensors and values; no config objects, no files, no network. Imports nothing else of iopo."""
