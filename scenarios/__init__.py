"""The standard chaos suite, installed as ``pytest_fdcluster.scenarios``.

Run it against any server: ``pytest -p fdcluster --pyargs pytest_fdcluster.scenarios
--fdcluster-server "CMD --port {port} --workers {workers}"``.  Every module uses only
the plugin's public API, as a user's own test files do.
"""
