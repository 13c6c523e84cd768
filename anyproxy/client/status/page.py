# -*- test-case-name: tests.test_client_status -*-
"""
The client's status page: C{page.html} with C{page.css} and C{page.js} put
inline (L{anyproxy.operator_site.self_contained_page}).  Its script polls
C{api/status} once a second and writes with C{textContent} only, so a
target name cannot inject markup.
"""

from anyproxy.operator_site import self_contained_page

PAGE, CONTENT_SECURITY_POLICY = self_contained_page(__package__)
