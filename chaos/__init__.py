"""The reliability suite: ``make chaos`` (``python -m chaos``). See docs/reliability.md."""
