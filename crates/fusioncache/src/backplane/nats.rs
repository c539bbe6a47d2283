//! NATS transport (feature `nats`).
