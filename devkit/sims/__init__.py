"""Simulators of the lock controllers, built from the drivers' production frame classes.

Each speaks the real protocol: the serial ones over a pseudo-terminal (``devkit.pty``,
the transport faults of ``base``), the MQTT ones as devices on a real broker::

    base.py         Responder, SimulatorServer, TransportFaults   (serial plumbing)
    modbus.py       RelayBoard, ModbusSimulator, ModbusSimBus
    lockboard.py    LockboardSim, start_lockboard_sim
    osdp.py         OsdpPdSim (libosdp in PD mode)
    zigbee2mqtt.py  Zigbee2MqttSim
    tasmota.py      TasmotaSim

Dev kit: the product (``gateway``, ``drivers``) never imports them.
"""
