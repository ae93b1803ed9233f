"""Benchmarks: goemo against the seed notebook's recipe (`python benchmarks/cpu.py --help`)."""
