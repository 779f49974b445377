"""edge-agent: runs signed ML models on edge devices, driven by a fleet over MQTT."""

__version__ = "0.1.0"
