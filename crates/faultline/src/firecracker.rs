//! The Firecracker page-fault handler protocol (being written).
