"""Courier field API: the web edge (config, auth, errors, blueprints, CLI)."""

from courier_api.app import create_app

__all__ = ["create_app"]
