//! kiln-coordinator
