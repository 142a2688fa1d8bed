"""Dummy third-party plugins for connhex-edge-ota's tests."""
