# -*- test-case-name: tests.test_passwords -*-
"""
C{anyproxy-passwd}: read a password, print the hash to put in a config file.

    $ anyproxy-passwd            # asks twice on a terminal, without echo
    $ printf '%s\\n' "$PW" | anyproxy-passwd --bcrypt

Exit codes: 0 printed a hash, 1 the password was refused (empty, the two
entries differ, too long for bcrypt), 2 bad usage.
"""

import argparse
import getpass
import sys

from anyproxy.passwords import hash_password


def _read_password(stdin, stderr):
    if stdin.isatty():
        first = getpass.getpass("Password: ", stream=stderr)
        again = getpass.getpass("Again: ", stream=stderr)
        if first != again:
            raise ValueError("the two entries differ")
        return first
    line = stdin.readline()
    return line[:-1] if line.endswith("\n") else line


def main(argv=None, stdin=None, stdout=None, stderr=None):
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    parser = argparse.ArgumentParser(
        prog="anyproxy-passwd",
        description="Read a password on standard input and print its hash for an AnyProxy "
                    "config file (argon2id by default).")
    parser.add_argument("--bcrypt", action="store_true",
                        help="print a bcrypt hash (cost 12) instead of argon2id")
    args = parser.parse_args(argv)
    try:
        password = _read_password(stdin, stderr)
        if not password:
            raise ValueError("empty password")
        hashed = hash_password(password, "bcrypt" if args.bcrypt else "argon2id")
    except (ValueError, EOFError) as e:
        stderr.write("anyproxy-passwd: %s\n" % (e,))
        return 1
    except KeyboardInterrupt:
        stderr.write("\n")
        return 1
    stdout.write(hashed + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
