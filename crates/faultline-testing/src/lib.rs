//! Helpers shared by faultline's tests: capability checks that skip with a printed reason,
//! page patterns, and fault-serving loops used as test fixtures.
#![deny(unsafe_code)]
