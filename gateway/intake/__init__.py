"""Intake: where a command or management request is verified and screened.

``commands`` (the verifier), ``screen`` (load shedding before the signature check),
``mgmt`` (remote management requests), ``mgmt_host`` (what they act on) and
``remote_config`` (what a ``config.set`` may change).
"""
