# -*- test-case-name: tests.test_e2e_status -*-
"""
The gateway's status page (served by L{anyproxy.gateway.status.api}):
C{page.html} with C{page.css} and C{page.js} put inline
(L{anyproxy.operator_site.self_contained_page}).  Its script polls
C{api/status} (relative, so the page also works behind a path prefix) once
a second and rewrites the DOM with C{textContent} only, so a client id or
address can never inject markup.
"""

from anyproxy.operator_site import self_contained_page

PAGE, CONTENT_SECURITY_POLICY = self_contained_page(__package__)
