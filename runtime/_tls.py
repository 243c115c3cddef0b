"""TLS for the listeners that serve it (TCP here, HTTP through hypercorn's config) and the identity a
client certificate gives under mutual TLS (docs/security.md "TLS and mutual TLS")."""

from __future__ import annotations

import ssl
from typing import Any

import trio

from ._auth import Principal


def server_context(certfile: str, keyfile: str, client_ca: str | None = None) -> ssl.SSLContext:
    """A server's context: TLS 1.2 at least, our certificate, and with ``client_ca`` a client
    certificate signed by that CA required (mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    if client_ca is not None:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    cafile: str | None = None, certfile: str | None = None, keyfile: str | None = None
) -> ssl.SSLContext:
    """A client's context: the system's CAs, or ``cafile``'s; with ``certfile`` (and ``keyfile``) a
    client certificate for a worker that requires one."""
    context = ssl.create_default_context(cafile=cafile)
    if certfile is not None:
        context.load_cert_chain(certfile, keyfile)
    return context


def certified_principal(stream: Any) -> Principal | None:
    """The principal a verified client certificate names (its subject, tenant = its common name), or
    None when the connection is not TLS or carries no client certificate."""
    if not isinstance(stream, trio.SSLStream):
        return None
    try:
        certificate = stream.getpeercert()
    except (ValueError, trio.NeedHandshakeError):
        return None
    if not certificate:
        return None
    fields = [pair for rdn in certificate.get("subject", ()) for pair in rdn]
    subject = ",".join(f"{_SHORT.get(key, key)}={value}" for key, value in fields)
    common_name = next((value for key, value in fields if key == "commonName"), subject)
    return Principal(subject, common_name)


_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C"}
