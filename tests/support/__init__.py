"""Test helpers that are more than fixtures: real processes the tests drive.

``support.broker`` runs one Mosquitto per test on a free loopback port and offers a small
synchronous MQTT client to publish commands and read what the gateway publishes.
"""
