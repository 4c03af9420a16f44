"""Sources, sinks, audio features and the live crowd-counting app."""
