"""Layer 4, the online rounds: the driver (run folder, session, judges, budget, rounds), the stages dispatched by
name from a method's row (stages), the pure choice of a round's pairs (pairs), the files joining the stages (files)
and the summary (summary)."""
