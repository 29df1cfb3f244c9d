"""Thin route modules, one per endpoint family."""
