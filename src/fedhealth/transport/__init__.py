"""Transport: the HTTP client plumbing the agent, the operator client and connectors share.

httpx bounds each read of a socket, not a whole answer: a server that sends one byte of its status line or
headers just inside the read timeout holds a client for as long as it likes. :class:`DeadlineTransport` is
httpx's own transport whose every socket operation (connect, TLS handshake, read, write) also ends at the
deadline set with :func:`answer_deadline`, and which ignores the environment's proxies and ``.netrc``: a
client here talks to the server it was given, verified by the TLS context it was given, and nothing else.
"""

from fedhealth.transport._deadline import DeadlineTransport, answer_deadline

__all__ = ["DeadlineTransport", "answer_deadline"]
