"""Test helpers that are more than fixtures and that only the tests use (the fake
broker, the hostile HTTP stand-in, the CLI in a subprocess, the event generator).

The helpers every test shares live in the dev kit and the root ``conftest.py``:
``devkit.testing`` (one fake clock, one ``wait_for``, one builder of the agent's TOML),
``tests/conftest.py`` (the ``clock``, ``broker`` and ``sandbox`` fixtures).  The builders
the tests share with the benchmarks and the demo are in the dev kit too:
``devkit.mosquitto`` (one Mosquitto per test on a free loopback port, and a small
synchronous MQTT client), ``devkit.site`` (a simulated site around the agent) and
``devkit.harness`` (one conformance harness per driver).
"""
