"""The node table: which AEs may call us, from where, and what they may ask for.

Each remote AE is listed under its AE title in ``dimse.nodes`` with the address it
connects from (``*`` for any) and one switch per service. AEs that are not listed are
refused, or — with ``dimse.accept_unknown_callers`` — allowed to store and verify only:
an unknown AE can never query or retrieve patient data.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass
from enum import StrEnum

from cloudfilm.audit.enums import ActorType
from cloudfilm.auth.permissions import Permission
from cloudfilm.auth.principal import Principal
from cloudfilm.config import DicomNode, DimseSettings

logger = logging.getLogger(__name__)


class Service(StrEnum):
    """What a caller asks for, as the node table's permission switches name it."""

    STORE = "store"
    FIND = "find"
    MOVE = "move"
    GET = "get"


#: The permission each DIMSE service needs: the same vocabulary as the HTTP routes.
SERVICE_PERMISSION = {
    Service.STORE: Permission.STUDY_STORE,
    Service.FIND: Permission.STUDY_SEARCH,
    Service.GET: Permission.STUDY_READ,
    Service.MOVE: Permission.STUDY_DOWNLOAD,
}


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a C-MOVE sends to: the node's AE title, an address to connect to, its port."""

    ae_title: str
    address: str
    port: int


class NodeTable:
    """Look-ups in ``dimse.nodes``; the settings are the only state."""

    def __init__(self, settings: DimseSettings) -> None:
        self.settings = settings

    def node(self, aet: str, address: str) -> DicomNode | None:
        """The node entry for ``aet`` calling from ``address``; ``None`` when the title is
        not listed or the address is not the node's."""
        node = self.settings.nodes.get(aet)
        if node is None or not _host_matches(node.host, address):
            return None
        return node

    def caller_allowed(self, aet: str, address: str) -> bool:
        """May ``aet`` at ``address`` open an association at all?"""
        if aet in self.settings.nodes:
            # A listed title from the wrong address is refused even when unknown callers
            # are accepted: someone is using a known node's name.
            return self.node(aet, address) is not None
        return self.settings.accept_unknown_callers

    def principal(self, aet: str, address: str) -> Principal:
        """The calling AE as a principal whose permissions are its node's switches.
        Unknown (but accepted) callers may only store."""
        node = self.node(aet, address)
        if node is None:
            unknown = aet not in self.settings.nodes and self.settings.accept_unknown_callers
            granted = {Permission.STUDY_STORE} if unknown else set()
        else:
            granted = {
                permission
                for service, permission in SERVICE_PERMISSION.items()
                if getattr(node, f"allow_{service.value}")
            }
        return Principal(ActorType.AE, aet, permissions=frozenset(granted))

    def may(self, aet: str, address: str, service: Service) -> bool:
        """May ``aet`` at ``address`` use ``service``?"""
        return self.principal(aet, address).may(SERVICE_PERMISSION[service])

    def destination(self, aet: str) -> Destination | None:
        """The C-MOVE destination named ``aet``; ``None`` unless it is listed with a host
        and port and the host name resolves."""
        node = self.settings.nodes.get(aet)
        if node is None or node.port is None or node.host in ("", "*"):
            return None
        addresses = _resolve(node.host)
        if not addresses:
            logger.warning("C-MOVE destination %s: host %r does not resolve", aet, node.host)
            return None
        return Destination(aet, addresses[0], node.port)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # ::ffff:10.1.2.3 is 10.1.2.3 on a dual-stack listener
    return ip


def _resolve(host: str) -> list[str]:
    """``host``'s addresses: itself when it is an IP address, else from the resolver."""
    if _ip(host) is not None:
        return [host]
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _host_matches(host: str, address: str) -> bool:
    if host == "*":
        return True
    peer = _ip(address)
    if peer is None:
        return host == address
    return any(_ip(candidate) == peer for candidate in _resolve(host))
