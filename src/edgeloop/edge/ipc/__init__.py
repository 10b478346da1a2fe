"""The hub's Greengrass-compatible IPC: eventstream RPC over a Unix socket."""
