"""The pure core: chunk plans, the KV-cache lifecycle, the rank-0 planner and the epoch gate.

No I/O, no threads, no torch: everything here is tested exhaustively (hypothesis)
and imports only ``protocol``, ``ppstage.config`` and ``ppstage.errors``
(checked by the import-linter contract in ``.importlinter``).
"""
