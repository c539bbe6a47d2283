//! Redis transports (feature `redis`).
