//! Abuse tests: link (filled in by its own change).
