"""The supervisor <-> worker contract: message types and their msgpack framing."""
