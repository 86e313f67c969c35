"""What a run shows: the HTML report and its plots, summary, progress, trackers, exports."""
