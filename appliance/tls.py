"""DICOM TLS: the server side of PS3.15 Annex B.9, the BCP 195 TLS Secure Transport Connection Profile.

BCP 195 (RFC 9325) asks for TLS 1.2 or 1.3 only, no compression, no renegotiation, and for TLS 1.2
only AEAD cipher suites with forward secrecy (ECDHE with AES-GCM or ChaCha20-Poly1305). TLS 1.3's
suites are all AEAD with forward secrecy, so OpenSSL's defaults stand. The node presents its
certificate; with ``ca_certificates`` it asks the client for one and verifies it against those
CAs, and with ``require_client_certificate`` a client without one is refused.
"""

from __future__ import annotations

import ssl

from .config import ConfigError, Tls

#: TLS 1.2 suites of RFC 9325 section 4.2 that OpenSSL offers without DH parameters.
BCP195_TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))


class TlsError(ConfigError):
    """The certificate, key or CA file cannot be used; the message names the file."""


def server_context(tls: Tls) -> ssl.SSLContext:
    """An :class:`ssl.SSLContext` for the node's DICOM TLS listener, as BCP 195 asks."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    try:
        ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    except (ssl.SSLError, OSError) as e:
        raise TlsError(f"tls.certificate = {str(tls.certificate)!r} with tls.private_key = "
                       f"{str(tls.private_key)!r} cannot be used: {e}; give a PEM certificate and "
                       "its unencrypted PEM private key") from None
    if tls.ca_certificates is not None:
        try:
            ctx.load_verify_locations(cafile=str(tls.ca_certificates))
        except (ssl.SSLError, OSError) as e:
            raise TlsError(f"tls.ca_certificates = {str(tls.ca_certificates)!r} cannot be used: {e}; "
                           "give a PEM file of CA certificates") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return ctx
