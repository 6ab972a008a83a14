"""The outbox: Timeline Events waiting to be posted to Stora, and the drain that posts them.

``timeline.py`` builds an event's record and its POST body (pure: the store keeps the
records and the units make them); ``policy.py`` holds the drain's states and what it
says; ``drainer.py`` runs the drain.  Import from those modules: this package imports
nothing itself, so that ``timeline.py`` stays free of the HTTP client.
See docs/design/outbox.md.
"""
