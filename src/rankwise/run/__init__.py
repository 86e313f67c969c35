"""Running a search: the study loop, the trial runner, executors, the run directory, the store."""
