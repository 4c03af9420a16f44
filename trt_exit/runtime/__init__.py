"""Runtime: backends, executor, policies and threshold tuning."""
