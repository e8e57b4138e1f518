"""The peer: downloads pieces from the swarm, verifies them and shares them."""
