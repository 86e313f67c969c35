"""The study: the orchestrator on top. It opens a session, runs the strategy through the
executor and the stages, and calls the reports back as observers."""
