"""Shared test configuration."""

pytest_plugins = ["trio_sessions.testing"]
