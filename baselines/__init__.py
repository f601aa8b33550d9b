"""Baselines, one module each. Every module registers its method class with ``@METHODS.register``;
modules are discovered automatically, so adding a baseline is one file plus one config entry."""
