"""Layer 3, training: the players of a METHODS row (players), the session that holds them with their optimizers
(session), the optimizer steps (fit), the batching (batching), FSDP2 (sharding), the log-probs and metrics of a
test split (scoring, refcache), the export (export) and the reward model's training (reward)."""
