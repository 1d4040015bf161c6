"""The control plane's routes, one blueprint per room (Chalice's multi-file convention): each
view parses the request, makes one call into `first_core`, and shapes the reply."""
