# -*- test-case-name: tests.test_tls -*-
"""
Make a development/demo CA, a gateway certificate and client certificates.

    python certs/generate.py [--out DIR] [--hosts localhost,127.0.0.1,::1]
                             [--client NAME] [--force]

It writes into DIR (by default the directory holding this script):

    ca.crt, ca.key          a private CA (keep ca.key secret)
    server.crt, server.key  the gateway's certificate, signed by the CA; its
                            subjectAltNames are the --hosts (DNS names and IP
                            addresses)
    client.crt, client.key  with --client NAME: a client certificate (clientAuth)
                            for mutual TLS, signed by the same CA

Existing files are kept unless --force is given.  A kept CA signs any newly
made certificate, so C{--client NAME} can be run after the first run.
Private keys are written with mode 0600.  Only C{cryptography} is used (no
openssl command line), so this works wherever AnyProxy is installed.

This is for development and demos.  In production, use your own CA; see
certs/README.md.
"""

import argparse
import datetime
import ipaddress
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")

# 825 days is the longest leaf lifetime that Apple platforms accept from a
# private CA.  The CA itself lives longer, so that leaves can be re-issued
# without redistributing ca.crt.
LEAF_LIFETIME = datetime.timedelta(days=825)
CA_LIFETIME = datetime.timedelta(days=3650)

# Backdate notBefore so that a peer whose clock is slightly behind still
# accepts a certificate that was just made.
_CLOCK_SKEW = datetime.timedelta(hours=1)

WRITTEN = "written"
KEPT = "kept"


def _new_key():
    # P-256 ECDSA: fast, small, and accepted by every TLS 1.2+ stack.
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name):
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "AnyProxy development"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _general_name(host):
    """A subjectAltName entry: an IP address if C{host} parses as one."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    # Certificates carry A-labels (punycode) for internationalised names.
    return x509.DNSName(host.encode("idna").decode("ascii").lower())


def _builder(subject, issuer, public_key, lifetime):
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + lifetime)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key),
            critical=False,
        )
    )


def _key_usage(**flags):
    names = (
        "digital_signature", "content_commitment", "key_encipherment",
        "data_encipherment", "key_agreement", "key_cert_sign", "crl_sign",
        "encipher_only", "decipher_only",
    )
    return x509.KeyUsage(**{name: flags.get(name, False) for name in names})


def make_ca(common_name="AnyProxy Development CA"):
    """
    Make a self-signed CA.

    @return: a 2-tuple of the CA certificate and its private key.
    """
    key = _new_key()
    name = _name(common_name)
    certificate = (
        _builder(name, name, key.public_key(), CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0),
                       critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True),
                       critical=True)
        .sign(key, hashes.SHA256())
    )
    return certificate, key


def _issue(ca_certificate, ca_key, common_name, usage, alt_names):
    key = _new_key()
    ca_ski = ca_certificate.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    ).value
    builder = (
        _builder(_name(common_name), ca_certificate.subject,
                 key.public_key(), LEAF_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                       critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_ski
            ),
            critical=False,
        )
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if alt_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(alt_names), critical=False
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def make_server_certificate(ca_certificate, ca_key, hosts):
    """
    Issue a gateway certificate (serverAuth) for C{hosts}.

    @param hosts: DNS names and IP addresses, each put in subjectAltName.
    @return: a 2-tuple of the certificate and its private key.
    """
    hosts = [host.strip() for host in hosts if host.strip()]
    if not hosts:
        raise ValueError("at least one host name or address is needed")
    return _issue(ca_certificate, ca_key, hosts[0][:64],
                  ExtendedKeyUsageOID.SERVER_AUTH,
                  [_general_name(host) for host in hosts])


def make_client_certificate(ca_certificate, ca_key, client_name):
    """
    Issue a client certificate (clientAuth) whose common name is
    C{client_name}.

    @return: a 2-tuple of the certificate and its private key.
    """
    if not client_name or len(client_name) > 64:
        raise ValueError("the client name must be 1 to 64 characters")
    return _issue(ca_certificate, ca_key, client_name,
                  ExtendedKeyUsageOID.CLIENT_AUTH, [])


def _write(path, data, private):
    """
    Write C{data} to C{path} atomically, with mode 0600 for private keys.

    The temporary file is created with the final mode, so a key is never
    readable by others, even for a moment.
    """
    temporary = path + ".tmp"
    mode = 0o600 if private else 0o644
    if os.path.lexists(temporary):
        os.unlink(temporary)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as output:
            output.write(data)
        # The umask may have removed bits of 0644, but never adds any.
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        if os.path.lexists(temporary):
            os.unlink(temporary)
        raise


def _certificate_pem(certificate):
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key):
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pair_state(out_dir, stem, force):
    """
    Decide whether the pair C{stem}.crt/C{stem}.key is made or kept.

    @return: C{True} if it must be (re)made.
    @raise ValueError: if only one half of the pair exists and C{force} is
        not set, since writing the other half would not match it.
    """
    crt = os.path.join(out_dir, stem + ".crt")
    key = os.path.join(out_dir, stem + ".key")
    if force:
        return True
    has_crt, has_key = os.path.exists(crt), os.path.exists(key)
    if has_crt and has_key:
        return False
    if has_crt or has_key:
        present, missing = (crt, key) if has_crt else (key, crt)
        raise ValueError(
            "%s exists but %s is missing; restore it or use --force to make "
            "a new pair" % (present, missing)
        )
    return True


def _load_ca(out_dir):
    crt = os.path.join(out_dir, "ca.crt")
    key_path = os.path.join(out_dir, "ca.key")
    with open(crt, "rb") as pem:
        certificate = x509.load_pem_x509_certificate(pem.read())
    with open(key_path, "rb") as pem:
        key = serialization.load_pem_private_key(pem.read(), password=None)
    return certificate, key


def generate(out_dir, hosts=DEFAULT_HOSTS, client_name=None, force=False):
    """
    Make whatever is missing of the CA, the gateway pair and a client pair.

    @param out_dir: directory to write to; it is created if missing.
    @param hosts: names and addresses for the gateway certificate, as a
        list or a comma-separated string.
    @param client_name: if set, also make C{client.crt}/C{client.key} with
        this common name.
    @param force: replace existing files instead of keeping them.
    @return: a list of (file name, L{WRITTEN} or L{KEPT}) pairs, in order.
    @raise ValueError: on bad arguments or a half-present key pair.
    """
    if isinstance(hosts, str):
        hosts = hosts.split(",")
    os.makedirs(out_dir, exist_ok=True)
    actions = []
    pairs = [("ca", None), ("server", None)]
    if client_name:
        pairs.append(("client", client_name))
    # Decide everything before writing anything, so an error leaves no
    # half-made set behind.
    plan = {stem: _pair_state(out_dir, stem, force) for stem, _ in pairs}

    if plan["ca"]:
        ca_certificate, ca_key = make_ca()
    elif plan["server"] or plan.get("client"):
        ca_certificate, ca_key = _load_ca(out_dir)

    for stem, name in pairs:
        if not plan[stem]:
            actions.extend([(stem + ".crt", KEPT), (stem + ".key", KEPT)])
            continue
        if stem == "ca":
            certificate, key = ca_certificate, ca_key
        elif stem == "server":
            certificate, key = make_server_certificate(
                ca_certificate, ca_key, list(hosts)
            )
        else:
            certificate, key = make_client_certificate(
                ca_certificate, ca_key, name
            )
        # The key goes first: a certificate without its key is useless,
        # and the next run would refuse a half pair.
        _write(os.path.join(out_dir, stem + ".key"), _key_pem(key), True)
        _write(os.path.join(out_dir, stem + ".crt"),
               _certificate_pem(certificate), False)
        actions.extend([(stem + ".crt", WRITTEN), (stem + ".key", WRITTEN)])
    return actions


def main(argv=None):
    """Command line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        description="Make a development CA and AnyProxy TLS certificates.",
    )
    parser.add_argument(
        "--out", default=os.path.dirname(os.path.abspath(__file__)),
        help="directory to write to (default: the certs/ directory)",
    )
    parser.add_argument(
        "--hosts", default=",".join(DEFAULT_HOSTS),
        help="comma-separated DNS names and IP addresses of the gateway "
             "(default: %(default)s)",
    )
    parser.add_argument(
        "--client", metavar="NAME",
        help="also make client.crt/client.key for mutual TLS",
    )
    parser.add_argument(
        "--force", action="store_true",
        help="replace existing files (default: keep them)",
    )
    options = parser.parse_args(argv)
    hosts = [host for host in options.hosts.split(",") if host.strip()]
    try:
        actions = generate(options.out, hosts, options.client, options.force)
    except (OSError, ValueError) as error:
        print("generate.py: error: %s" % (error,), file=sys.stderr)
        return 1
    for file_name, action in actions:
        path = os.path.join(options.out, file_name)
        if action == KEPT:
            print("kept    %s (exists; --force replaces it)" % (path,))
        else:
            print("wrote   %s" % (path,))
    return 0


if __name__ == "__main__":
    sys.exit(main())
