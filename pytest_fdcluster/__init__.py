"""pytest-fdcluster: test prefork servers that hand client sockets to workers."""

__version__ = "0.1.0"
