# -*- test-case-name: tests.test_tls -*-
"""
TLS for the tunnel: the gateway's server options and the client's options.

The tunnel is WebSocket over TLS.  Both sides
require TLS 1.2 or newer.  By default the client checks the gateway's
certificate and hostname.  The gateway can also require client certificates
(mutual TLS).

The functions here return Twisted connection creators, to pass to
C{SSL4ServerEndpoint}, C{wrapClientTLS}, C{listenSSL} and the like.  Nothing
here opens a socket.

Why the PEM files are parsed with C{cryptography} rather than with
C{Certificate.loadPEM}: the operator should get one line naming the file and
the problem (malformed, encrypted, key does not match).  Twisted would give an
OpenSSL error stack from the first handshake instead.

Trust: the file the client trusts (C{gateway_tls_cert}) may be a CA or the
gateway's own certificate, as configs commonly do.  Go's TLS
accepts a CA-issued leaf in that role, but plain OpenSSL only accepts
self-signed roots.  So every certificate in our trust files is a trust anchor
(C{X509_V_FLAG_PARTIAL_CHAIN}).  The operator chose those files
explicitly, so that is the intended meaning.  The hostname is still checked.

Memory per idle connection (a gateway holds thousands of idle tunnels):
Twisted's C{CertificateOptions} sets C{SSL_MODE_RELEASE_BUFFERS} on every
context, so OpenSSL frees an idle connection's read and write buffers; with
OpenSSL 4.0 a gateway's end then holds about 33 KiB after the handshake
(66 KiB without it).  8-9 KiB of that is the client's X25519MLKEM768 key
share, kept until the connection ends.  4.5 KiB is the memory BIOs Twisted
runs OpenSSL over, grown by the handshake's flights; a tunnel gives those
back once it is open, and again when quiet after bulk data
(L{anyproxy.tunnel.tls_transport.release_buffers}).
tests/test_idle_tunnels.py checks that both sides' connections get the mode.
"""

import datetime
import ipaddress
import os
import stat

import idna

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
# IOpenSSLTrustRoot is the documented type of CertificateOptions' trustRoot=
# argument, but Twisted defines it only in this private module.
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from zope.interface import implementer

from anyproxy.errors import ConfigError

__all__ = [
    "MINIMUM_TLS_VERSION",
    "TLSFileError",
    "client_tls_options",
    "load_certificates",
    "load_key_and_chain",
    "server_tls_options",
]

log = Logger()

# Nothing older than TLS 1.2 on the tunnel, either side.
MINIMUM_TLS_VERSION = TLSVersion.TLSv1_2

# Key files are read once at start-up and reload.  The limit keeps a mistaken
# path (a log file, a disk image) from being read whole into memory.
_MAX_PEM_FILE_SIZE = 1024 * 1024


class TLSFileError(ConfigError, ValueError):
    """
    A certificate or key file cannot be used.  The message names the file
    and says what is wrong with it, in one line.
    """


def _read_pem_file(path, what):
    """
    Read a PEM file in full.

    @param path: the file's path.
    @param what: what the file should hold, for error messages.
    @return: the file's bytes.
    @raise TLSFileError: if the file is missing, unreadable, too big or
        holds no PEM block.
    """
    if not path:
        raise TLSFileError("no %s file given" % (what,))
    try:
        with open(path, "rb") as pem_file:
            data = pem_file.read(_MAX_PEM_FILE_SIZE + 1)
    except OSError as error:
        raise TLSFileError(
            "%s: cannot read %s: %s" % (path, what, error.strerror or error)
        ) from error
    if len(data) > _MAX_PEM_FILE_SIZE:
        raise TLSFileError(
            "%s: too big for a %s file (over %d bytes)"
            % (path, what, _MAX_PEM_FILE_SIZE)
        )
    if b"-----BEGIN " not in data:
        raise TLSFileError("%s: no PEM data found (expected %s)" % (path, what))
    return data


def load_certificates(path):
    """
    Load every certificate in a PEM file, in file order.

    Other PEM blocks (a private key stored in the same file) are skipped.

    @param path: the PEM file's path.
    @return: a non-empty list of L{cryptography.x509.Certificate}.
    @raise TLSFileError: if the file cannot be read or holds no valid
        certificate.
    """
    data = _read_pem_file(path, "PEM certificates")
    if b"CERTIFICATE-----" not in data:
        raise TLSFileError("%s: no PEM certificate found" % (path,))
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as error:
        raise TLSFileError(
            "%s: malformed PEM certificate (%s)" % (path, _short(error))
        ) from error


def _load_private_key(path):
    """
    Load the one unencrypted private key in a PEM file.

    @raise TLSFileError: if the key is missing, malformed or encrypted.
    """
    data = _read_pem_file(path, "a PEM private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as error:
        # cryptography raises TypeError for a key that needs a password.
        raise TLSFileError(
            "%s: the private key is encrypted; AnyProxy needs an "
            "unencrypted key (protect it with file permissions)" % (path,)
        ) from error
    except ValueError as error:
        raise TLSFileError(
            "%s: malformed PEM private key (%s)" % (path, _short(error))
        ) from error
    _warn_if_readable_by_others(path)
    return key


def load_key_and_chain(cert_path, key_path):
    """
    Load a certificate chain and the private key of its first certificate.

    @param cert_path: a PEM file holding the certificate first, then any
        intermediate CA certificates, in order.
    @param key_path: a PEM file holding the unencrypted private key of the
        first certificate.  It may be the same file as C{cert_path}.
    @return: a 2-tuple of the private key and the non-empty list of
        certificates (leaf first), as C{cryptography} objects.
    @raise TLSFileError: if a file cannot be read or parsed, or if the key
        does not belong to the first certificate.
    """
    chain = load_certificates(cert_path)
    key = _load_private_key(key_path)
    key_public = _public_bytes(key.public_key())
    if _public_bytes(chain[0].public_key()) != key_public:
        for index, other in enumerate(chain[1:], start=2):
            if _public_bytes(other.public_key()) == key_public:
                raise TLSFileError(
                    "%s: the key in %s belongs to certificate #%d in this "
                    "file; put that certificate first, then its CA "
                    "certificates" % (cert_path, key_path, index)
                )
        raise TLSFileError(
            "%s: the private key in %s does not match this certificate"
            % (cert_path, key_path)
        )
    _warn_if_not_current(cert_path, chain[0])
    return key, chain


def _identity_options(cert_path, key_path):
    """
    The C{CertificateOptions} keyword arguments that present a certificate.

    They are C{cryptography} objects, which pyOpenSSL takes without the
    deprecation warning that its own X509/PKey wrappers now cause.
    """
    key, chain = load_key_and_chain(cert_path, key_path)
    options = dict(
        privateKey=key, certificate=chain[0], extraCertChain=chain[1:]
    )
    # Twisted builds the OpenSSL context lazily, at the first handshake.
    # Building one now reports what OpenSSL refuses (an RSA key too small
    # for its security level, an unsupported key type) at start-up, with the
    # file's name, instead of failing every connection later.
    try:
        CertificateOptions(
            raiseMinimumTo=MINIMUM_TLS_VERSION, **options
        ).getContext()
    except (SSL.Error, TypeError, ValueError) as error:
        raise TLSFileError(
            "%s: OpenSSL refuses this certificate or its key %s (%s)"
            % (cert_path, key_path, openssl_reason(error))
        ) from error
    return options


@implementer(IOpenSSLTrustRoot)
class _ExplicitTrustRoot:
    """
    Trust exactly the given certificates, each as a trust anchor.

    It wraps L{trustRootFromCertificates} and adds C{PARTIAL_CHAIN}, so a
    pinned CA-issued gateway (or client) certificate verifies on its own.
    See the module docstring.
    """

    def __init__(self, certificates):
        self._inner = trustRootFromCertificates(certificates)

    def _addCACertsToContext(self, context):
        self._inner._addCACertsToContext(context)
        context.get_cert_store().set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)


def _trust_root(path):
    """An L{IOpenSSLTrustRoot} trusting every certificate in C{path}."""
    return _ExplicitTrustRoot(
        [Certificate(crypto.X509.from_cryptography(cert))
         for cert in load_certificates(path)]
    )


def server_tls_options(cert_path, key_path, client_ca_path=None):
    """
    TLS options for the gateway's tunnel listener.

    @param cert_path: PEM file with the gateway certificate first, then any
        intermediate CA certificates (they are sent to clients).
    @param key_path: PEM file with the certificate's unencrypted private key.
    @param client_ca_path: if set, a PEM file of the CA certificate(s), or
        pinned client certificates, that client certificates must verify
        against.  Clients without such a certificate are refused during the
        handshake (mutual TLS).  If not set, no client certificate is asked
        for.
    @return: an L{IOpenSSLServerConnectionCreator} that only speaks TLS 1.2
        or newer.
    @raise TLSFileError: if a file cannot be read or parsed, or the key does
        not match the certificate.
    """
    options = _identity_options(cert_path, key_path)
    options["raiseMinimumTo"] = MINIMUM_TLS_VERSION
    if client_ca_path:
        # A trustRoot makes CertificateOptions set VERIFY_PEER and
        # VERIFY_FAIL_IF_NO_PEER_CERT.  OpenSSL then also checks the client
        # certificate's extended key usage (clientAuth) against purpose
        # "sslclient".
        options["trustRoot"] = _trust_root(client_ca_path)
    return CertificateOptions(**options)


def client_tls_options(
    server_name,
    ca_path,
    client_cert_path=None,
    client_key_path=None,
    insecure=False,
):
    """
    TLS options for a client dialing a gateway.

    @param server_name: the gateway's name as the client knows it: a DNS
        name (checked against the certificate's DNS subjectAltNames and sent
        as SNI) or an IP address (checked against its IP subjectAltNames).
        Brackets around an IPv6 address are ignored.
    @param ca_path: PEM file of the certificates to trust: a CA, several
        CAs, or the gateway's own certificate.  If empty or C{None}, the
        platform's trust store is used (for a gateway with a publicly
        trusted certificate).
    @param client_cert_path: optional PEM file with a client certificate
        (then intermediates) for gateways that require mutual TLS.
    @param client_key_path: the private key of C{client_cert_path}; it
        defaults to C{client_cert_path} itself (a combined PEM file).
    @param insecure: B{for debugging only.}  If true, the gateway's
        certificate and name are not checked at all, so anyone on the path
        can read and change the tunnel, credentials included.  It is
        logged as a warning every time options are made.
    @return: an L{IOpenSSLClientConnectionCreator} that only speaks TLS 1.2
        or newer.
    @raise TLSFileError: if a file cannot be read or parsed, or the key does
        not match the certificate.
    @raise ValueError: if C{server_name} is empty.
    """
    if isinstance(server_name, bytes):
        server_name = server_name.decode("ascii")
    server_name = (server_name or "").strip()
    if server_name.startswith("[") and server_name.endswith("]"):
        server_name = server_name[1:-1]
    if not server_name:
        raise ValueError("client_tls_options: server_name must not be empty")

    extra_options = {"raiseMinimumTo": MINIMUM_TLS_VERSION}
    if client_cert_path:
        # Passed as plain options rather than optionsForClientTLS's
        # clientCertificate=, which would hand pyOpenSSL its deprecated
        # X509/PKey wrappers.
        extra_options.update(_identity_options(
            client_cert_path, client_key_path or client_cert_path
        ))
    elif client_key_path:
        raise TLSFileError(
            "%s: a client key was given without a client certificate"
            % (client_key_path,)
        )

    if insecure:
        log.warn(
            "TLS VERIFICATION IS DISABLED for the gateway {server_name!r}: "
            "anyone on the network path can impersonate the gateway and "
            "read the tunnel, credentials included.  Use this only for "
            "debugging, never in production.",
            server_name=server_name,
        )
        return _InsecureClientTLSOptions(
            CertificateOptions(verify=False, **extra_options), server_name
        )

    trust_root = _trust_root(ca_path) if ca_path else platformTrust()
    return optionsForClientTLS(
        server_name,
        trustRoot=trust_root,
        extraCertificateOptions=extra_options,
    )


@implementer(IOpenSSLClientConnectionCreator)
class _InsecureClientTLSOptions:
    """
    Client options that skip every certificate check but still send SNI.

    C{optionsForClientTLS} always verifies the server, so the insecure mode
    has to be built by hand.  SNI is still sent so that a gateway behind an
    SNI-routing front end stays reachable while debugging.
    """

    def __init__(self, certificate_options, server_name):
        self._certificate_options = certificate_options
        self._sni = None
        if not _is_ip_address(server_name):
            try:
                self._sni = server_name.encode("idna")
            except UnicodeError:
                # Not a valid DNS name: there is nothing to send as SNI.
                pass

    def clientConnectionForTLS(self, tls_protocol):
        connection = self._certificate_options.clientConnectionForTLS(
            tls_protocol
        )
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        return connection


def check_server_name(name):
    """
    Refuse (C{ValueError}, with the reason) a gateway name that TLS cannot
    check a certificate against: not an IP address, and not a name IDNA
    2008 encodes (as Twisted's L{optionsForClientTLS} does), such as one
    with an underscore or an empty label.
    """
    name = name.strip()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if _is_ip_address(name):
        return
    try:
        idna.encode(name)
    except (idna.IDNAError, UnicodeError) as e:
        raise ValueError("%r is not a DNS name a certificate can be checked against (%s)"
                         % (name, e)) from None


def _is_ip_address(text):
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _public_bytes(public_key):
    return public_key.public_bytes(
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )


def openssl_reason(error):
    """The innermost reason of an OpenSSL error stack, else the text."""
    details = error.args[0] if error.args else None
    if isinstance(details, list) and details and len(details[-1]) == 3:
        return details[-1][2]
    return _short(error)


def _short(error):
    """One line of an exception's text, without cryptography's FAQ link."""
    text = str(error).split(" See https://", 1)[0].strip()
    return text.splitlines()[0] if text else error.__class__.__name__


def _warn_if_not_current(path, certificate):
    """Log a warning if a certificate has expired or is not valid yet."""
    now = datetime.datetime.now(datetime.timezone.utc)
    if certificate.not_valid_after_utc < now:
        log.warn(
            "{path}: certificate expired on {when}; peers will refuse it",
            path=path,
            when=certificate.not_valid_after_utc.isoformat(),
        )
    elif certificate.not_valid_before_utc > now:
        log.warn(
            "{path}: certificate is not valid before {when}; peers will "
            "refuse it until then (check the clock)",
            path=path,
            when=certificate.not_valid_before_utc.isoformat(),
        )


def _warn_if_readable_by_others(path):
    """Warn about a private key file that group or others may read."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warn(
            "{path}: private key file is accessible to other users "
            "(mode {mode}); chmod 600 it",
            path=path,
            mode="%04o" % (stat.S_IMODE(mode),),
        )
