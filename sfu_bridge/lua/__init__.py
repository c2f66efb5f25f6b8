"""Versioned Redis Lua scripts (package data, loaded by path at run time)."""
