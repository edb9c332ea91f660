"""Fault drills: deliberate, parity-checked faults for the break-it suite (SPEC §11)."""
