"""The peer daemon's registry mirror and HTTP(S) proxy."""
