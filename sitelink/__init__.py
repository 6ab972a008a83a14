"""The site link protocol shared by the gateway and the relay (contract §4, §5).

Pure code over bytes: it imports nothing of the gateway, the drivers, the relay or the
dev kit, and of third-party libraries only ``cryptography`` (lazily, inside the
functions that sign or verify); tests/test_layering.py holds it to that.  Import from
the modules (``from sitelink.codes import Reason``): this file imports none of them, so
a CLI that needs one small piece (``one_line``, ``rfc3339``) loads only that.

==================  ===================================================================
module              what it holds
==================  ===================================================================
``codes``           ``Cmd``, ``MgmtCmd``, ``Reason``, ``Status``: the contract's names
``claims``          ``Command`` (verified), ``Claims`` (to sign), the limits
                    (``MAX_COMMAND_BYTES``, ``JTI_MAX``, ``DUR_MAX``, …), the claim rules
``jws``             the compact serialization: base64url, strict JSON, keys, signing
``verify``          ``Verifier``: every rule, in its order (the design essay is there)
``sign``            ``CommandSigner``
``topics``          ``Topics``: ``P/S/cmd``, ``P/S/units/<unit>``, …
``payloads``        result, management result, unit state and alarm payloads;
                    ``rfc3339``
``errors``          ``Rejection`` and its base ``SitelinkError``; ``one_line``
``golden``          the golden vectors (``vectors/commands.json``) and how to judge them
==================  ===================================================================
"""
