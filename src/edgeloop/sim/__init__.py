"""The appliance simulator: monitoring kits on furnaces, washers, fridges and water pumps.

``models`` describes appliances, sensors and fault modes as data; ``plants`` holds their
physics; ``scenario`` reads a home (kits, seeds, fault injections) from JSON or YAML;
``generator`` turns a scenario into labelled readings, deterministically by seed;
``payload`` is the kit's MQTT topic and JSON payload; ``kits`` runs each kit as a real
MQTT client over mutual TLS (``edgeloop sim kits``). Only ``kits`` does I/O.
"""
