"""The dfly wire protocol: control frames and slices on one TCP stream."""
