//! Redis distributed cache (feature `redis`).
