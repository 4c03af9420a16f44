"""NVTX ranges, timers, latency reports and plots."""
