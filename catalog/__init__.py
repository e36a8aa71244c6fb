"""The bundled price catalog and routing policy: data only, installed as ``farebox.catalog``.

``model_costs.json`` (prices per 1M tokens and quality tiers) and ``policy.json`` (routing, PII,
cache and budget rules) are read with ``importlib.resources``; ``FAREBOX_CATALOG`` and
``FAREBOX_POLICY`` point farebox at files of your own instead.
"""
