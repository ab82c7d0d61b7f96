"""Backends: how container traffic is carried between hosts."""
