"""QEMU live migration: the sans-IO wire format (:mod:`.wire`) and the endpoints built on it."""
