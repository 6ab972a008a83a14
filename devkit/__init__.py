"""The dev kit: demo, sandbox, simulators and test-site builders; never imported by the product.

It sits beside ``gateway/`` and ``drivers/`` (style.md, "Layers you can see from the
folder list"): it may import them, they never import it (``tests/test_layering_devkit.py``
checks every import, function-level ones included).  Its commands reach
``stora-gateway`` through the CLI's plugin point (``gateway/cli/plugins.py``)::

    commands.py          the CLI plugin: demo, sandbox, simulate, selftest (parsers only)
    demo.py              ``stora-gateway demo``: the whole loop on simulated hardware
                         (demo_site.py its names and config, demo_watch.py its client)
    embedded_broker.py   the demo's pure-Python MQTT broker (mqtt_codec.py its wire
                         encoding; demo_broker.py picks it or Mosquitto)
    sandbox/             ``stora-gateway sandbox``: a local stand-in for the Stora API
    simulate.py          ``stora-gateway simulate DRIVER`` (options: simulate_options.py)
    selftest.py          ``stora-gateway selftest``: a signed unlock end to end
    pty.py               pseudo-terminals standing in for RS-485 adapters
    sims/                a simulator per driver, and ``base.py``, their shared plumbing
    mosquitto.py         a real Mosquitto on a free port (tls_files.py its certificates,
                         broker_client.py a small synchronous client)
    testing/             the tests' shared helpers: a fake clock, wait_for, the agent's
                         TOML builder
    signer.py            mints signed commands (sitelink's signer, a key file reader)
    site.py              a simulated site around the agent (in-process or a subprocess)
    harness/             one conformance harness per driver
    faults.py, agent.py  test faults, and ``python -m devkit.agent`` that runs the agent
                         with them
"""
