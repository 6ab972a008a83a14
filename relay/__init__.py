"""``stora-relay``: the partner's cloud service between Stora and the site gateways.

Operators connect their Stora account here (OAuth Authorization Code with PKCE); the
relay holds their tokens, turns Stora's signed webhooks into signed commands for each
site, offers apps an unlock API, and brokers the gateways' Timeline Events under one
rate limit per operator (contract §7).  It shares only the site link protocol
(``sitelink``) with the gateway and imports nothing else of it.

Its dependencies are the ``relay`` extra: ``pip install 'stora-gateway[relay]'``.
"""

__version__ = "0.1.0"
