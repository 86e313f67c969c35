"""One trial's lifecycle on a loaded model: attach, fit, evaluate, detach; its hooks."""
