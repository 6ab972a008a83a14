"""The agent's link to the MQTT broker (paho-mqtt 2.x, MQTT 5), by concern::

    mqtt.py         MqttLink: public API, the connection and worker threads
    core.py         the paho client, its state and callbacks (connection thread)
    inbox.py        the inbound queue and its load shedding
    message.py      Message, the status payloads, the publish size cap's log
    timing.py       LinkTimings, full_jitter_delay
    tls.py          the broker's TLS context and password file
    stats.py        the link's counters
    wire.py         the paho fast path (read-ahead, lean PUBLISH, packet cap)
    site_client.py  the technician tools' own broker client (watch, selftest)

It builds on the drivers' MQTT transport (:mod:`drivers.mqtt`).  Import from the
modules: this file imports none of them, so that the CLI's commands that need only the
TLS settings (``locks`` building an MQTT driver) do not load paho.  See
docs/design/mqtt-link.md.
"""
