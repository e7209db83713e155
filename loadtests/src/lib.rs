//! kiln-loadtests
