"""Benchmark harnesses: each measures one stage beside its baseline, in one run; the top of the house."""
