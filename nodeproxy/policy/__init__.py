"""Mesh policy: peer authentication and authorization, evaluated on verified identities."""

from nodeproxy.policy.authorization import (
    Authorizer,
    ConnectionAttributes,
    Decision,
    DestinationWorkload,
)
from nodeproxy.policy.kernel_rules import CompiledDenies, KernelDeny, compile_connect_denies
from nodeproxy.policy.peer_authentication import PeerAuthenticator

__all__ = [
    "Authorizer",
    "CompiledDenies",
    "ConnectionAttributes",
    "Decision",
    "DestinationWorkload",
    "KernelDeny",
    "PeerAuthenticator",
    "compile_connect_denies",
]
