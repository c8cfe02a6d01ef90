"""Sockets and their options, CurveZMQ keys and ZAP, the control-channel client, link probes."""
