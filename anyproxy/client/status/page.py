# -*- test-case-name: tests.test_client_status -*-
"""
The client's status page: C{page.html} with C{page.css} and C{page.js} put
inline (package data), one self-contained document.  Its script polls
C{api/status} once a second and writes with C{textContent} only, so a
target name cannot inject markup; the Content-Security-Policy allows this
script and this style, by hash, and fetches to the same origin.
"""

import base64
import hashlib
from importlib import resources

_HERE = resources.files(__package__)
STYLE = _HERE.joinpath("page.css").read_text(encoding="utf-8")
SCRIPT = _HERE.joinpath("page.js").read_text(encoding="utf-8")
PAGE = (_HERE.joinpath("page.html").read_text(encoding="utf-8")
        .replace("/* page.css */", STYLE).replace("/* page.js */", SCRIPT).encode("utf-8"))


def _hash_source(text):
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-%s'" % (base64.b64encode(digest).decode("ascii"),)


CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src %s; style-src %s; connect-src 'self'; img-src data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    % (_hash_source(SCRIPT), _hash_source(STYLE))).encode("ascii")
