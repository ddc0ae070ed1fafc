"""Thin adapters over :func:`mpaudit.watch` for training frameworks (torch side; optional extras).

* :mod:`mpaudit.integrations.transformers`: ``MPAuditCallback`` for the Hugging Face ``Trainer``
  (``pip install "mpaudit[transformers]"``).
* :mod:`mpaudit.integrations.lightning`: ``MPAuditCallback`` for Lightning (``pip install "mpaudit[lightning]"``).

Each imports its framework only when the module itself is imported, so ``import mpaudit`` never needs them.
"""
