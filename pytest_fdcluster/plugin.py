"""The pytest plugin (hooks, options, fixtures)."""
