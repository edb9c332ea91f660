"""Micro-benchmarks behind ``ppstage bench``. Not tests: they print, they never gate CI."""
