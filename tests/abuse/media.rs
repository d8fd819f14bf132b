//! Abuse tests: media (filled in by its own change).
