"""Test helpers that are more than fixtures and that only the tests use (the fake
broker, the hostile HTTP stand-in, the CLI in a subprocess, the event generator).

The builders the tests share with the benchmarks and the demo live in the dev kit:
``devkit.mosquitto`` (one Mosquitto per test on a free loopback port, and a small
synchronous MQTT client), ``devkit.site`` (a simulated site around the agent) and
``devkit.harness`` (one conformance harness per driver).
"""
