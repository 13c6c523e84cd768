"""Script shared by the operator pages (L{anyproxy.operator_site.self_contained_page})."""
