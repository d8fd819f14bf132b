//! Abuse tests: origin (filled in by its own change).
