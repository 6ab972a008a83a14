"""The Stora client: tokens, rate limits and ``POST /timeline/events``, exactly once.

Every action the gateway takes reaches Stora as one Timeline Event (contract §6); this
package decides, for one attempt, what was sent, what came back and what the next
attempt must be.  The outbox (gateway/outbox/) persists what must survive a restart.

==========================  ===========================================================
``errors.py``               ``StoraError``, ``CredentialRejected``, ``TokenUnavailable``
``ratelimit.py``            ``RateLimiter`` and the waiting policies (backoff, 429)
``tokens.py``               ``TokenSource``, ``ClientCredentialsTokens``, ``FileTokens``
``idempotency.py``          ``IdempotencyKey`` and how long a key may be replayed
``answers.py``              the outcomes and Stora's §6 error envelope
``client.py``               ``StoraClient`` (one delivery attempt), ``make_http_client``
``http.py``                 bounded HTTP: deadlines, capped bodies
``limits.py``               tamed text, trusted ids, the token request's deadline
==========================  ===========================================================

Import from the modules: this file imports none of them, so that what needs only the
light ones (the outbox's policy, ``status``) does not load httpx.  See
docs/design/idempotency.md.
"""
