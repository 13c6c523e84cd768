# -*- test-case-name: tests.test_client_access -*-
"""
What each client credential may do at the gateway.

A client tunnel proves who it is in two ways: a password in the WebSocket
opening handshake (C{Authorization: Basic}), or, with C{gateway.client_ca},
a certificate verified by TLS.  Either way the gateway finds the
L{ClientGrant} behind it, and the grant, not the client's HELLO, decides
which groups the tunnel may serve, which client ids it may announce and how
many tunnels the credential may hold at once.  So a client host that is
compromised exposes only the groups its own credential serves.

Where a grant comes from:

  - a C{gateway.clients} entry with C{username}/C{password}: that password;
  - a C{gateway.clients} entry with C{subject}: a verified client
    certificate whose common name or a DNS/URI subject alternative name is
    that subject (no password needed);
  - the shared credential: C{gateway.auth_username}/C{auth_password}, or a
    certificate from C{client_ca} that matches no C{subject} entry (with a
    password too when one is configured).  It serves C{gateway.auth_groups},
    by default only the group C{default}.

A password entry holds one secret or several (C{passwords}: rotation, any
of them is valid), each an argon2id or bcrypt hash or plain text
(L{anyproxy.passwords}).  Plain text is compared in constant time; a hash
is checked in the gateway's L{anyproxy.passwords.PasswordChecker} (its
thread pool, good pairs remembered), so L{ClientCredentials.grant_for}
answers at once when it can and says L{PENDING} when
L{ClientCredentials.check_grant} must.  An unknown name costs the same
check as a known one (against a decoy: a configured hash).
"""

import fnmatch

import attr
from cryptography import x509
from cryptography.x509.oid import NameOID
from twisted.internet import defer
from twisted.logger import Logger

from anyproxy.auth import PENDING
from anyproxy.config.model import SHARED_CERTIFICATE_CREDENTIAL, SHARED_CREDENTIAL
from anyproxy.passwords import PasswordChecker, scheme_of

log = Logger()

ANY_GROUP = "*"
SHARED = SHARED_CREDENTIAL  # the shared credential's name in logs and counts
SHARED_CERTIFICATE = SHARED_CERTIFICATE_CREDENTIAL  # a client_ca certificate, no subject entry
SHARED_NAMES = (SHARED, SHARED_CERTIFICATE)  # the shared credential's grant is named one of these

def _to_bytes(text):
    return text.encode("utf-8") if isinstance(text, str) else bytes(text)


def _secrets(password):
    """A configured password, or a rotation's several, as a tuple of texts."""
    return tuple(password) if isinstance(password, (list, tuple)) else (password,)


_DECOY_NAME = b"\0unknown"  # never a configured name
_PLAIN_DECOY = ("\0" * 32,)


@attr.s(frozen=True, slots=True)
class ClientGrant:
    """
    What one client credential may serve.

    @ivar name: how logs, counts and the status page name the credential
        (its username, C{subject:<subject>}, or the shared names).
    @ivar groups: the group names it may serve; C{"*"} among them = any.
    @ivar client_ids: C{fnmatch} patterns its HELLO C{client_id} must
        match; empty = any id.
    @ivar max_tunnels: tunnels it may hold open at once.
    """

    name = attr.ib()
    groups = attr.ib(converter=tuple)
    client_ids = attr.ib(converter=tuple)
    max_tunnels = attr.ib()

    def allows_group(self, group):
        return ANY_GROUP in self.groups or group in self.groups

    def allows_client_id(self, client_id):
        if not self.client_ids:
            return True
        return any(fnmatch.fnmatchcase(client_id, pattern) for pattern in self.client_ids)

    def describe(self):
        """The groups, for start-up and refusal messages."""
        return "any group" if ANY_GROUP in self.groups else ", ".join(self.groups)


@attr.s(frozen=True)
class ClientCredentials:
    """
    Every credential a client may present, built from the gateway config
    (L{from_config}); replaced whole on reload.

    @ivar passwords: C{username (bytes) -> (password, ClientGrant)}: the
        password configured (a hash or plain text), or a tuple of several.
    @ivar subjects: C{certificate subject -> ClientGrant}.
    @ivar shared: the grant of the shared credential.
    @ivar certificates: whether TLS verifies client certificates
        (C{client_ca}): a verified certificate is then a credential too.
    @ivar checker: the L{PasswordChecker} (the gateway's, shared with its
        other logins).
    """

    passwords = attr.ib(factory=dict, repr=False)
    subjects = attr.ib(factory=dict)
    shared = attr.ib(default=None)
    certificates = attr.ib(default=False)
    checker = attr.ib(factory=PasswordChecker, repr=False, eq=False)

    @classmethod
    def from_config(cls, gateway, checker=None):
        """The credentials of a L{anyproxy.config.model.GatewayConfig}."""
        shared = ClientGrant(SHARED if gateway.auth_username else SHARED_CERTIFICATE,
                             gateway.auth_groups, (), gateway.auth_max_tunnels)
        passwords, subjects = {}, {}
        if gateway.auth_username:
            passwords[_to_bytes(gateway.auth_username)] = (gateway.auth_password, shared)
        for entry in gateway.clients:
            grant = ClientGrant(entry.name, entry.groups, entry.client_ids, entry.max_tunnels)
            if entry.subject:
                subjects[entry.subject] = grant
            else:
                passwords[_to_bytes(entry.username)] = (entry.secrets, grant)
        return cls(passwords=passwords, subjects=subjects, shared=shared,
                   certificates=gateway.client_ca is not None,
                   checker=checker if checker is not None else PasswordChecker())

    def _entry(self, username):
        """C{(checked name, secrets, grant or None)}: an unknown name gets the decoy."""
        name = _to_bytes(username)
        found = self.passwords.get(name)
        if found is not None:
            return name, _secrets(found[0]), found[1]
        decoy = next((secret for password, _ in self.passwords.values()
                      for secret in _secrets(password) if scheme_of(secret) != "plain"), None)
        return _DECOY_NAME, (decoy,) if decoy is not None else _PLAIN_DECOY, None

    def check_password(self, username, password):
        """
        The grant of a username/password pair when known at once: the
        L{ClientGrant}, C{None} (wrong), or L{PENDING} when a hash must be
        checked (L{check_password_later}).
        """
        name, secrets, grant = self._entry(username)
        ok = self.checker.check_now(name, _to_bytes(password), secrets)
        if ok is None:
            return PENDING
        return grant if ok and grant is not None else None

    def check_password_later(self, username, password):
        """A Deferred firing with the grant of a username/password pair, or C{None}."""
        name, secrets, grant = self._entry(username)
        return self.checker.check(name, _to_bytes(password), secrets).addCallback(
            lambda ok: grant if ok and grant is not None else None)

    def grant_named(self, name):
        """The grant called C{name} now (after a reload), or C{None}."""
        for grant in self.grants():
            if grant.name == name:
                return grant
        return None

    def grants(self):
        """Every grant a client can log in with now."""
        found = [grant for _, grant in self.passwords.values()] + list(self.subjects.values())
        if self._certificate_is_shared:
            found.append(self.shared)
        return found

    def grant_for(self, certificate_subjects, credentials):
        """
        The grant of a connecting client, or C{None} to refuse it; or
        L{PENDING} when a password hash must be checked (then
        L{check_grant}).

        @param certificate_subjects: the subjects of the client certificate
            TLS verified (L{certificate_subjects}); empty without one.
        @param credentials: C{(username, password)} from the handshake's
            C{Authorization} header, or C{None}.
        """
        return self._grant(certificate_subjects, credentials, self.check_password)

    def check_grant(self, certificate_subjects, credentials):
        """L{grant_for} as a Deferred, hashes checked."""
        found = self._grant(certificate_subjects, credentials, self.check_password_later)
        return found if isinstance(found, defer.Deferred) else defer.succeed(found)

    def _grant(self, certificate_subjects, credentials, check_password):
        if self.certificates:
            for subject in certificate_subjects:
                grant = self.subjects.get(subject)
                if grant is not None:
                    return grant
        if credentials is not None and self.passwords:
            return check_password(*credentials)
        if self._certificate_is_shared and certificate_subjects:
            return self.shared
        return None

    @property
    def _certificate_is_shared(self):
        # With client_ca and no auth_username, a verified certificate that
        # matches no subject entry is the shared credential.
        return self.certificates and self.shared.name == SHARED_CERTIFICATE


def certificate_subjects(certificate):
    """
    The names a client certificate may be granted by (C{subject} entries):
    its common names, then its DNS and URI subject alternative names.

    @param certificate: a pyOpenSSL C{X509} or a C{cryptography} certificate,
        or C{None}.
    """
    if certificate is None:
        return []
    if hasattr(certificate, "to_cryptography"):
        certificate = certificate.to_cryptography()
    names = [attribute.value for attribute in
             certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return names
    names.extend(san.get_values_for_type(x509.DNSName))
    names.extend(san.get_values_for_type(x509.UniformResourceIdentifier))
    return names


class TunnelCounts:
    """How many tunnels each credential holds, by grant name."""

    def __init__(self):
        self._counts = {}

    def full(self, grant):
        return self._counts.get(grant.name, 0) >= grant.max_tunnels

    def add(self, name):
        self._counts[name] = self._counts.get(name, 0) + 1

    def remove(self, name):
        left = self._counts.get(name, 0) - 1
        if left > 0:
            self._counts[name] = left
        else:
            self._counts.pop(name, None)

    def get(self, name):
        return self._counts.get(name, 0)


def log_client_grants(credentials):
    """
    Say at start-up (and reload) what each client credential may serve, and
    warn when the shared one may serve any group: then every client host
    holding it can take any group's users.
    """
    for grant in credentials.grants():
        log.info("client credential {credential} may serve {groups}{ids}, at most "
                 "{max_tunnels} tunnels", credential=grant.name, groups=grant.describe(),
                 ids=" as client ids %s" % (", ".join(grant.client_ids),) if grant.client_ids
                 else "", max_tunnels=grant.max_tunnels)
    shared = credentials.shared
    if shared is not None and shared in credentials.grants() and ANY_GROUP in shared.groups:
        log.warn("gateway.auth_groups is ['*']: the shared client credential may serve every "
                 "group, so any client host holding it can receive any group's users; give "
                 "each site its own entry in gateway.clients instead")
