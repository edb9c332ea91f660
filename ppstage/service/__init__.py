"""``ppstage serve``'s HTTP service: rank 0's API, live frames, viewer page, metrics.

``host`` (the service in the stage-0 actor's loop), ``app`` (routes),
``schemas`` (request/response bodies), ``frames`` (WebSocket fan-out),
``metrics`` (Prometheus), ``options`` (settings besides the config),
``static/viewer.html`` (the viewer page). See ``docs/operations.md``.
"""
