"""Address conversion, from socket's C core.

``import socket`` also builds socket.py's enums, about 3 ms of every start of ``read``;
the decoders and the tracker need these five names only.
"""

from _socket import AF_INET, AF_INET6, gethostname, inet_ntop, inet_pton

__all__ = ["AF_INET", "AF_INET6", "gethostname", "inet_ntop", "inet_pton"]
