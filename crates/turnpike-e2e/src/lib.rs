//! End-to-end protocol tests through the real Turnpike gateway; see `tests/`.
