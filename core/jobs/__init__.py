"""Background work: the SQLite job queue, the runs registry, duration estimates, workers and job runners."""
