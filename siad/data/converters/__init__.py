"""Converters from each dataset's native layout to the ``meta.json`` index (one module per dataset).

Each module exposes ``CLASSES``, ``EXPECTED_TEST_COUNTS`` (protocol -> class -> (normal, anomalous))
and ``convert(root, options) -> Meta``; :mod:`siad.data.registry` assembles them into dataset specs.
Shared helpers live in :mod:`siad.data.converters.common`.
"""
