//! Intentionally empty: the check lives in `tests/regen.rs`.
