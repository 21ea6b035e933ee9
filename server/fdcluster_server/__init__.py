"""fdcluster_server: the reference prefork RPC server of pytest-fdcluster.

A master accepts every connection and hands the socket to one of its workers
over a Unix socketpair (SCM_RIGHTS), keeping its copy until the worker
acknowledges it.  Run it with ``python -m fdcluster_server --help``.
"""

__version__ = "0.1.0"
