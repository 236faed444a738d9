"""Mesh policy: peer authentication and authorization, evaluated on verified identities."""

from nodeproxy.policy.authorization import (
    L7_CHECKED_UPSTREAM,
    Authorizer,
    ConnectionAttributes,
    Decision,
    DestinationWorkload,
    RequestAttributes,
)
from nodeproxy.policy.kernel_rules import CompiledDenies, KernelDeny, compile_connect_denies
from nodeproxy.policy.peer_authentication import PeerAuthenticator

__all__ = [
    "L7_CHECKED_UPSTREAM",
    "Authorizer",
    "CompiledDenies",
    "ConnectionAttributes",
    "Decision",
    "DestinationWorkload",
    "KernelDeny",
    "PeerAuthenticator",
    "RequestAttributes",
    "compile_connect_denies",
]
