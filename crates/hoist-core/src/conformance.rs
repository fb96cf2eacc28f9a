//! Backend conformance suite (filled in by the embedded-backend work).
